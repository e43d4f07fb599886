"""Bakong KHQR payloads (EMV merchant-presented QR): decode, verify and generate them, with no IO and no clock."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum

# Limits. Field limits are the official SDK's (npm `bakong-khqr` `emv.INVALID_LENGTH`); lengths count
# characters (Unicode code points), never bytes, as EMV's "length = number of characters" rule says.
payload_characters_min = 12  # the SDK's INVALID_LENGTH.KHQR: shorter cannot hold even 00 and 63
payload_characters_max = 512  # EMVCo MPM: a payload may not exceed 512 characters
field_value_characters_max = 99  # two length digits
bakong_account_id_characters_max = 32
account_information_characters_max = 32
merchant_id_characters_max = 32
acquiring_bank_characters_max = 32
upi_merchant_account_characters_max = 99
payload_format_indicator_characters_max = 2
point_of_initiation_characters_max = 2
merchant_category_code_characters_max = 4
transaction_currency_characters_max = 3
amount_characters_max = 13
# ISO 3166 alpha-2; the npm SDK allows 3, but its own tests reject the 3-letter "KKH" (go-khqr, ts-khqr).
country_code_characters_max = 2
merchant_name_characters_max = 25
merchant_city_characters_max = 15
bill_number_characters_max = 25
mobile_number_characters_max = 25
store_label_characters_max = 25
terminal_label_characters_max = 25
purpose_characters_max = 25
language_preference_characters = 2  # exact: an ISO 639-1 code
merchant_name_alternate_language_characters_max = 25
merchant_city_alternate_language_characters_max = 15
timestamp_digits = 13  # exact: milliseconds since the epoch, as the SDK writes them
crc_hex_digits = 4

default_merchant_category_code = "5999"
crc_field_prefix = "6304"  # tag 63, length 04: the CRC covers everything up to and including this
currency_by_code = {"116": "KHR", "840": "USD"}
code_by_currency = {name: code for code, name in currency_by_code.items()}
cents_per_dollar = 100

template_tags = frozenset({"29", "30", "62", "64", "99"})
_static = "11"
_dynamic = "12"
_digits = re.compile(r"[0-9]+", re.ASCII)
_decimal = re.compile(r"([0-9]+)(?:\.([0-9]+))?", re.ASCII)
_crc_hex = re.compile(rf"[0-9A-Fa-f]{{{crc_hex_digits}}}", re.ASCII)


class ErrorCode(IntEnum):
    """The official SDK's error catalogue (npm `bakong-khqr` `constant/errorCode.js`), codes 1-51."""

    BAKONG_ACCOUNT_ID_REQUIRED = 1
    MERCHANT_NAME_REQUIRED = 2
    BAKONG_ACCOUNT_ID_INVALID = 3
    TRANSACTION_AMOUNT_INVALID = 4
    MERCHANT_TYPE_REQUIRED = 5
    BAKONG_ACCOUNT_ID_LENGTH_INVALID = 6
    MERCHANT_NAME_LENGTH_INVALID = 7
    KHQR_INVALID = 8
    CURRENCY_TYPE_REQUIRED = 9
    BILL_NUMBER_LENGTH_INVALID = 10
    STORE_LABEL_LENGTH_INVALID = 11
    TERMINAL_LABEL_LENGTH_INVALID = 12
    CONNECTION_TIMEOUT = 13
    INVALID_DEEP_LINK_SOURCE_INFO = 14
    # Spelled as the SDK spells it: the name is part of the catalogue callers match on.
    INTERNAL_SREVER = 15
    PAYLOAD_FORMAT_INDICATOR_LENGTH_INVALID = 16
    POINT_INITIATION_LENGTH_INVALID = 17
    MERCHANT_CODE_LENGTH_INVALID = 18
    TRANSACTION_CURRENCY_LENGTH_INVALID = 19
    COUNTRY_CODE_LENGTH_INVALID = 20
    MERCHANT_CITY_LENGTH_INVALID = 21
    CRC_LENGTH_INVALID = 22
    PAYLOAD_FORMAT_INDICATOR_TAG_REQUIRED = 23
    CRC_TAG_REQUIRED = 24
    MERCHANT_CATEGORY_TAG_REQUIRED = 25
    COUNTRY_CODE_TAG_REQUIRED = 26
    MERCHANT_CITY_TAG_REQUIRED = 27
    UNSUPPORTED_CURRENCY = 28
    INVALID_DEEP_LINK_URL = 29
    MERCHANT_ID_REQUIRED = 30
    ACQUIRING_BANK_REQUIRED = 31
    MERCHANT_ID_LENGTH_INVALID = 32
    ACQUIRING_BANK_LENGTH_INVALID = 33
    MOBILE_NUMBER_LENGTH_INVALID = 34
    ACCOUNT_INFORMATION_LENGTH_INVALID = 35
    TAG_NOT_IN_ORDER = 36
    LANGUAGE_PREFERENCE_REQUIRED = 37
    LANGUAGE_PREFERENCE_LENGTH_INVALID = 38
    MERCHANT_NAME_ALTERNATE_LANGUAGE_REQUIRED = 39
    MERCHANT_NAME_ALTERNATE_LANGUAGE_LENGTH_INVALID = 40
    MERCHANT_CITY_ALTERNATE_LANGUAGE_LENGTH_INVALID = 41
    PURPOSE_OF_TRANSACTION_LENGTH_INVALID = 42
    UPI_ACCOUNT_INFORMATION_LENGTH_INVALID = 43
    UPI_ACCOUNT_INFORMATION_INVALID_CURRENCY = 44
    EXPIRATION_TIMESTAMP_REQUIRED = 45
    KHQR_EXPIRED = 46
    INVALID_DYNAMIC_KHQR = 47
    POINT_OF_INITIATION_METHOD_INVALID = 48
    EXPIRATION_TIMESTAMP_LENGTH_INVALID = 49
    EXPIRATION_TIMESTAMP_IN_THE_PAST = 50
    INVALID_MERCHANT_CATEGORY_CODE = 51


# The SDK's messages, word for word (typos included) so that logs match what Bakong integrators know.
error_messages: dict[ErrorCode, str] = {
    ErrorCode.BAKONG_ACCOUNT_ID_REQUIRED: "Bakong Account ID cannot be null or empty",
    ErrorCode.MERCHANT_NAME_REQUIRED: "Merchant name cannot be null or empty",
    ErrorCode.BAKONG_ACCOUNT_ID_INVALID: "Bakong Account ID is invalid",
    ErrorCode.TRANSACTION_AMOUNT_INVALID: "Amount is invalid",
    ErrorCode.MERCHANT_TYPE_REQUIRED: "Merchant type cannot be null or empty",
    ErrorCode.BAKONG_ACCOUNT_ID_LENGTH_INVALID: "Bakong Account ID Length is Invalid",
    ErrorCode.MERCHANT_NAME_LENGTH_INVALID: "Merchant Name Length is invalid",
    ErrorCode.KHQR_INVALID: "KHQR provided is invalid",
    ErrorCode.CURRENCY_TYPE_REQUIRED: "Currency type cannot be null or empty",
    ErrorCode.BILL_NUMBER_LENGTH_INVALID: "Bill Name Length is invalid",
    ErrorCode.STORE_LABEL_LENGTH_INVALID: "Store Label Length is invalid",
    ErrorCode.TERMINAL_LABEL_LENGTH_INVALID: "Terminal Label Length is invalid",
    ErrorCode.CONNECTION_TIMEOUT: "Cannot reach Bakong Open API service. Please check internet connection",
    ErrorCode.INVALID_DEEP_LINK_SOURCE_INFO: "Source Info for Deep Link is invalid",
    ErrorCode.INTERNAL_SREVER: "Internal server error",
    ErrorCode.PAYLOAD_FORMAT_INDICATOR_LENGTH_INVALID: "Payload Format indicator Length is invalid",
    ErrorCode.POINT_INITIATION_LENGTH_INVALID: "Point of initiation Length is invalid",
    ErrorCode.MERCHANT_CODE_LENGTH_INVALID: "Merchant code Length is invalid",
    ErrorCode.TRANSACTION_CURRENCY_LENGTH_INVALID: "Transaction currency Length is invalid",
    ErrorCode.COUNTRY_CODE_LENGTH_INVALID: "Country code Length is invalid",
    ErrorCode.MERCHANT_CITY_LENGTH_INVALID: "Merchant city Length is invalid",
    ErrorCode.CRC_LENGTH_INVALID: "CRC Length is invalid",
    ErrorCode.PAYLOAD_FORMAT_INDICATOR_TAG_REQUIRED: "Payload format indicator tag required",
    ErrorCode.CRC_TAG_REQUIRED: "CRC tag required",
    ErrorCode.MERCHANT_CATEGORY_TAG_REQUIRED: "Merchant category tag required",
    ErrorCode.COUNTRY_CODE_TAG_REQUIRED: "Country Code cannot be null or empty",
    ErrorCode.MERCHANT_CITY_TAG_REQUIRED: "Merchant City cannot be null or empty",
    ErrorCode.UNSUPPORTED_CURRENCY: "Unsupported currency",
    ErrorCode.INVALID_DEEP_LINK_URL: "Deep Link URL is not valid",
    ErrorCode.MERCHANT_ID_REQUIRED: "Merchant ID cannot be null or empty",
    ErrorCode.ACQUIRING_BANK_REQUIRED: "Acquiring Bank cannot be null or empty",
    ErrorCode.MERCHANT_ID_LENGTH_INVALID: "Merchant ID Length is invalid",
    ErrorCode.ACQUIRING_BANK_LENGTH_INVALID: "Acquiring Bank Length is invalid",
    ErrorCode.MOBILE_NUMBER_LENGTH_INVALID: "Mobile Number Length is invalid",
    ErrorCode.ACCOUNT_INFORMATION_LENGTH_INVALID: "Account Information Length is invalid",
    ErrorCode.TAG_NOT_IN_ORDER: "Tag is not in order",
    ErrorCode.LANGUAGE_PREFERENCE_REQUIRED: "Language Preference cannot be null or empty",
    ErrorCode.LANGUAGE_PREFERENCE_LENGTH_INVALID: "Language Preference Length is invalid",
    ErrorCode.MERCHANT_NAME_ALTERNATE_LANGUAGE_REQUIRED: "Merchant Name Alternate Language cannot be null or empty",
    ErrorCode.MERCHANT_NAME_ALTERNATE_LANGUAGE_LENGTH_INVALID: "Merchant Name Alternate Language Length is invalid",
    ErrorCode.MERCHANT_CITY_ALTERNATE_LANGUAGE_LENGTH_INVALID: "Merchant City Alternate Language Length is invalid",
    ErrorCode.PURPOSE_OF_TRANSACTION_LENGTH_INVALID: "Purpose of Transaction Length is invalid",
    ErrorCode.UPI_ACCOUNT_INFORMATION_LENGTH_INVALID: "Upi Account Information Length is invalid",
    ErrorCode.UPI_ACCOUNT_INFORMATION_INVALID_CURRENCY: "Upi Account Information Length does not accept USD",
    ErrorCode.EXPIRATION_TIMESTAMP_REQUIRED: "Expiration timestamp is required for dynamic KHQR",
    ErrorCode.KHQR_EXPIRED: "This dynamic KHQR has expired",
    ErrorCode.INVALID_DYNAMIC_KHQR: "This dynamic KHQR has invalid field transaction amount",
    ErrorCode.POINT_OF_INITIATION_METHOD_INVALID: "Point of Initiation Method is invalid",
    ErrorCode.EXPIRATION_TIMESTAMP_LENGTH_INVALID: "Expiration timestamp length is invalid",
    ErrorCode.EXPIRATION_TIMESTAMP_IN_THE_PAST: "Expiration timestamp is in the past",
    ErrorCode.INVALID_MERCHANT_CATEGORY_CODE: "Invalid merchant category code",
}


class KhqrError(Exception):
    """A payload or a generate request the KHQR rules refuse: the SDK's code and name, and what is wrong."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(f"{code} {name}: {message}")
        self.code = code
        self.name = name
        self.message = message


def _error(error: ErrorCode, detail: str) -> KhqrError:
    return KhqrError(int(error), error.name, f"{error_messages[error]} ({detail})")


class MerchantType(StrEnum):
    individual = "individual"  # tag 29
    merchant = "merchant"  # tag 30


@dataclass(frozen=True, slots=True)
class TlvField:
    """One tag-length-value field as it stands in the payload; a template's nested fields in `subfields`."""

    tag: str
    value: str
    subfields: tuple[TlvField, ...] = ()


@dataclass(frozen=True, slots=True)
class KhqrPayload:
    """A decoded KHQR. A field is None when its tag is absent or its value does not parse; `tags` keeps all."""

    merchant_type: MerchantType | None
    bakong_account_id: str | None
    merchant_id: str | None
    acquiring_bank: str | None
    account_information: str | None
    upi_merchant_account: str | None
    merchant_category_code: str | None
    currency: str | None
    amount_minor: int | None
    country_code: str | None
    merchant_name: str | None
    merchant_city: str | None
    bill_number: str | None
    mobile_number: str | None
    store_label: str | None
    terminal_label: str | None
    purpose: str | None
    language_preference: str | None
    merchant_name_alternate_language: str | None
    merchant_city_alternate_language: str | None
    created_ms: int | None
    expires_ms: int | None
    is_dynamic: bool
    crc: str | None
    tags: tuple[TlvField, ...]


# CRC and MD5 -------------------------------------------------------------------------------------------


def crc16(text: str) -> str:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, unreflected) of the UTF-8 bytes, as 4 upper-case hex."""
    crc = 0xFFFF
    for byte in text.encode("utf-8"):
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return f"{crc:04X}"


def md5_hex(text: str) -> str:
    """Lower-case hex MD5 of the whole payload: Bakong's `check_transaction_by_md5` lookup key, not a MAC."""
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


# TLV ---------------------------------------------------------------------------------------------------


def _parse_fields(text: str, where: str) -> tuple[TlvField, ...]:
    fields: list[TlvField] = []
    seen: set[str] = set()
    position = 0
    while position < len(text):
        header = text[position : position + 4]
        if len(header) < 4 or not _digits.fullmatch(header):
            raise _error(ErrorCode.KHQR_INVALID, f"{where}: malformed tag or length {header!r} at character {position}")
        tag, length = header[:2], int(header[2:])
        value = text[position + 4 : position + 4 + length]
        if len(value) != length:
            raise _error(
                ErrorCode.KHQR_INVALID,
                f"{where}: tag {tag} says {length} characters but only {len(value)} remain",
            )
        if tag in seen:
            raise _error(ErrorCode.KHQR_INVALID, f"{where}: tag {tag} appears twice")
        seen.add(tag)
        subfields = _parse_fields(value, f"template {tag}") if where == "payload" and tag in template_tags else ()
        fields.append(TlvField(tag, value, subfields))
        position += 4 + length
    return tuple(fields)


def _encode(field: TlvField) -> str:
    value = "".join(_encode(subfield) for subfield in field.subfields) if field.subfields else field.value
    if len(value) > field_value_characters_max:
        raise _error(
            ErrorCode.KHQR_INVALID,
            f"tag {field.tag} would hold {len(value)} characters; a field holds at most {field_value_characters_max}",
        )
    return f"{field.tag}{len(value):02d}{value}"


def _check_text(text: str) -> None:
    if not payload_characters_min <= len(text) <= payload_characters_max:
        raise _error(
            ErrorCode.KHQR_INVALID,
            f"{len(text)} characters; a KHQR has {payload_characters_min} to {payload_characters_max}",
        )
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise _error(ErrorCode.KHQR_INVALID, f"not encodable as UTF-8 at character {error.start}") from None


# Values ------------------------------------------------------------------------------------------------


def _amount_problem(value: str, currency: str | None) -> str | None:
    if value == "":
        return "the amount is empty"
    if len(value) > amount_characters_max:
        return f"{len(value)} characters; at most {amount_characters_max}"
    match = _decimal.fullmatch(value)
    if match is None:
        return f"{value!r} is not an unsigned decimal number"
    if currency is None:
        return "no supported currency to read the amount in"
    fraction = (match.group(2) or "").rstrip("0")
    if currency == "KHR" and fraction:
        return f"{value!r} is not a whole number of riel"
    if currency == "USD" and len(fraction) > 2:
        return f"{value!r} has more than 2 decimals of a dollar"
    return None


def _amount_minor(value: str, currency: str) -> int:
    match = _decimal.fullmatch(value)
    assert match is not None, "callers check _amount_problem first"
    whole, fraction = int(match.group(1)), (match.group(2) or "").rstrip("0")
    if currency == "KHR":
        return whole
    return whole * cents_per_dollar + int(fraction.ljust(2, "0"))


def _amount_text(amount_minor: int, currency: str) -> str:
    if currency == "KHR":
        return str(amount_minor)
    dollars, cents = divmod(amount_minor, cents_per_dollar)
    # Whole dollars without decimals, as the official SDK writes them ("10", not "10.00").
    return str(dollars) if cents == 0 else f"{dollars}.{cents:02d}"


def _timestamp_ms(value: str | None) -> int | None:
    if value is None or len(value) != timestamp_digits or not _digits.fullmatch(value):
        return None
    return int(value)


# Decode ------------------------------------------------------------------------------------------------


def decode(text: str) -> KhqrPayload:
    """Parse a payload's structure. Raises KhqrError (KHQR_INVALID) only for malformed TLV; checks no rule."""
    _check_text(text)
    tags = _parse_fields(text, "payload")
    top = {field.tag: field for field in tags}
    if "29" in top and "30" in top:
        raise _error(ErrorCode.KHQR_INVALID, "both tag 29 (individual) and tag 30 (merchant) are present")
    account_tag = "30" if "30" in top else "29"
    account = _subvalues(top, account_tag)
    additional = _subvalues(top, "62")
    language = _subvalues(top, "64")
    timestamps = _subvalues(top, "99")
    currency = currency_by_code.get(_value(top, "53") or "")
    is_merchant = account_tag == "30"
    return KhqrPayload(
        merchant_type=_merchant_type(top),
        bakong_account_id=account.get("00"),
        merchant_id=account.get("01") if is_merchant else None,
        acquiring_bank=account.get("02"),
        account_information=None if is_merchant else account.get("01"),
        upi_merchant_account=_value(top, "15"),
        merchant_category_code=_value(top, "52"),
        currency=currency,
        amount_minor=_decoded_amount(_value(top, "54"), currency),
        country_code=_value(top, "58"),
        merchant_name=_value(top, "59"),
        merchant_city=_value(top, "60"),
        bill_number=additional.get("01"),
        mobile_number=additional.get("02"),
        store_label=additional.get("03"),
        terminal_label=additional.get("07"),
        purpose=additional.get("08"),
        language_preference=language.get("00"),
        merchant_name_alternate_language=language.get("01"),
        merchant_city_alternate_language=language.get("02"),
        created_ms=_timestamp_ms(timestamps.get("00")),
        expires_ms=_timestamp_ms(timestamps.get("01")),
        is_dynamic=_value(top, "01") == _dynamic,
        crc=_value(top, "63"),
        tags=tags,
    )


def _merchant_type(top: dict[str, TlvField]) -> MerchantType | None:
    if "30" in top:
        return MerchantType.merchant
    return MerchantType.individual if "29" in top else None


def _decoded_amount(value: str | None, currency: str | None) -> int | None:
    if value is None or currency is None or _amount_problem(value, currency) is not None:
        return None
    return _amount_minor(value, currency)


def _value(top: dict[str, TlvField], tag: str) -> str | None:
    field = top.get(tag)
    return None if field is None else field.value


def _subvalues(top: dict[str, TlvField], tag: str) -> dict[str, str]:
    field = top.get(tag)
    return {} if field is None else {subfield.tag: subfield.value for subfield in field.subfields}


# Verify ------------------------------------------------------------------------------------------------


def verify(text: str, now_ms: int) -> KhqrPayload:
    """Decode a payload and check every KHQR rule at `now_ms`; raises KhqrError with the SDK's code if one fails."""
    _check_text(text)
    _check_crc(text)
    payload = decode(text)
    if payload.tags[-1].tag != "63":
        raise _error(ErrorCode.CRC_TAG_REQUIRED, f"the last field is tag {payload.tags[-1].tag}, not the CRC (63)")
    _check_fields(payload.tags, now_ms)
    return payload


def _check_crc(text: str) -> None:
    # The SDK checks the CRC before anything else, so a corrupted payload is reported as corrupted
    # rather than by whichever field the corruption happened to land in.
    crc_start = len(text) - crc_hex_digits
    if text[crc_start - len(crc_field_prefix) : crc_start] != crc_field_prefix:
        raise _error(
            ErrorCode.CRC_TAG_REQUIRED, f"the payload does not end with {crc_field_prefix} and {crc_hex_digits} digits"
        )
    carried = text[crc_start:]
    if not _crc_hex.fullmatch(carried):
        raise _error(ErrorCode.KHQR_INVALID, f"CRC {carried!r} is not {crc_hex_digits} hexadecimal digits")
    computed = crc16(text[:crc_start])
    if carried.upper() != computed:
        raise _error(
            ErrorCode.KHQR_INVALID, f"CRC mismatch: the payload carries {carried}, its content gives {computed}"
        )


def _check_fields(tags: tuple[TlvField, ...], now_ms: int) -> None:
    """The rules of the SDK's `decodeValidation`, in its order: dynamic fields, required tags, then each tag."""
    top = {field.tag: field for field in tags}
    account_tag = "30" if "30" in top else "29"
    initiation = _value(top, "01")
    if initiation == _dynamic and "54" not in top:
        raise _error(ErrorCode.INVALID_DYNAMIC_KHQR, "a dynamic KHQR (01=12) must carry an amount (54)")
    if (initiation == _dynamic or "54" in top) and "99" not in top:
        raise _error(ErrorCode.EXPIRATION_TIMESTAMP_REQUIRED, "a KHQR with an amount must carry timestamps (99)")
    _check_required(top, account_tag)
    _check_header(top)
    _check_account(top[account_tag], merchant=account_tag == "30")
    _check_transaction(top)
    _check_merchant(top)
    _check_additional(_subvalues(top, "62"))
    if "64" in top:
        _check_language(_subvalues(top, "64"))
    if initiation == _dynamic:
        _check_timestamps(_subvalues(top, "99"), now_ms)


_required_tags = (
    ("00", ErrorCode.PAYLOAD_FORMAT_INDICATOR_TAG_REQUIRED),
    ("29", ErrorCode.MERCHANT_TYPE_REQUIRED),
    ("52", ErrorCode.MERCHANT_CATEGORY_TAG_REQUIRED),
    ("53", ErrorCode.CURRENCY_TYPE_REQUIRED),
    ("58", ErrorCode.COUNTRY_CODE_TAG_REQUIRED),
    ("59", ErrorCode.MERCHANT_NAME_REQUIRED),
    ("60", ErrorCode.MERCHANT_CITY_TAG_REQUIRED),
)


def _check_required(top: dict[str, TlvField], account_tag: str) -> None:
    for tag, error in _required_tags:
        present = account_tag in top if tag == "29" else tag in top
        if not present:
            raise _error(error, f"tag {tag} is missing")


def _check_length(value: str, limit: int, error: ErrorCode, what: str) -> None:
    if len(value) > limit:
        raise _error(error, f"{what} is {len(value)} characters; at most {limit}")


def _check_present(value: str | None, error: ErrorCode, what: str) -> str:
    if not value:
        raise _error(error, f"{what} is missing or empty")
    return value


def _check_header(top: dict[str, TlvField]) -> None:
    indicator = _check_present(
        _value(top, "00"), ErrorCode.PAYLOAD_FORMAT_INDICATOR_TAG_REQUIRED, "the payload format indicator (00)"
    )
    _check_length(
        indicator,
        payload_format_indicator_characters_max,
        ErrorCode.PAYLOAD_FORMAT_INDICATOR_LENGTH_INVALID,
        "the payload format indicator (00)",
    )
    initiation = _value(top, "01")
    if initiation is not None:
        _check_length(
            initiation,
            point_of_initiation_characters_max,
            ErrorCode.POINT_INITIATION_LENGTH_INVALID,
            "the point of initiation (01)",
        )
        if initiation not in (_static, _dynamic):
            raise _error(ErrorCode.POINT_OF_INITIATION_METHOD_INVALID, f"01 is {initiation!r}, not 11 or 12")
    upi = _value(top, "15")
    if upi is not None:
        _check_length(
            upi, upi_merchant_account_characters_max, ErrorCode.UPI_ACCOUNT_INFORMATION_LENGTH_INVALID, "tag 15"
        )
        if _value(top, "53") == code_by_currency["USD"]:
            raise _error(ErrorCode.UPI_ACCOUNT_INFORMATION_INVALID_CURRENCY, "a UnionPay account (15) with USD")


def _check_account(field: TlvField, merchant: bool) -> None:
    values = {subfield.tag: subfield.value for subfield in field.subfields}
    account = _check_present(values.get("00"), ErrorCode.BAKONG_ACCOUNT_ID_REQUIRED, f"the account ID ({field.tag}.00)")
    _check_length(
        account, bakong_account_id_characters_max, ErrorCode.BAKONG_ACCOUNT_ID_LENGTH_INVALID, "the account ID"
    )
    name, at, domain = account.partition("@")
    if not (name and at and domain) or "@" in domain:
        raise _error(ErrorCode.BAKONG_ACCOUNT_ID_INVALID, f"{account!r} is not name@bank")
    bank: str | None
    if merchant:
        merchant_id = _check_present(values.get("01"), ErrorCode.MERCHANT_ID_REQUIRED, "the merchant ID (30.01)")
        _check_length(merchant_id, merchant_id_characters_max, ErrorCode.MERCHANT_ID_LENGTH_INVALID, "the merchant ID")
        bank = _check_present(values.get("02"), ErrorCode.ACQUIRING_BANK_REQUIRED, "the acquiring bank (30.02)")
    else:
        information = values.get("01")
        if information is not None:
            _check_length(
                information,
                account_information_characters_max,
                ErrorCode.ACCOUNT_INFORMATION_LENGTH_INVALID,
                "the account information (29.01)",
            )
        bank = values.get("02")
        if bank is not None:
            _check_present(bank, ErrorCode.ACQUIRING_BANK_REQUIRED, "the acquiring bank (29.02)")
    if bank is not None:
        _check_length(
            bank, acquiring_bank_characters_max, ErrorCode.ACQUIRING_BANK_LENGTH_INVALID, "the acquiring bank"
        )


def _check_transaction(top: dict[str, TlvField]) -> None:
    category = _check_present(
        _value(top, "52"), ErrorCode.MERCHANT_CATEGORY_TAG_REQUIRED, "the merchant category code (52)"
    )
    _check_length(
        category,
        merchant_category_code_characters_max,
        ErrorCode.MERCHANT_CODE_LENGTH_INVALID,
        "the merchant category code",
    )
    if not _digits.fullmatch(category):
        raise _error(ErrorCode.INVALID_MERCHANT_CATEGORY_CODE, f"{category!r} is not 1 to 4 digits")
    currency_code = _check_present(_value(top, "53"), ErrorCode.CURRENCY_TYPE_REQUIRED, "the currency (53)")
    _check_length(
        currency_code, transaction_currency_characters_max, ErrorCode.TRANSACTION_CURRENCY_LENGTH_INVALID, "53"
    )
    currency = currency_by_code.get(currency_code)
    if currency is None:
        raise _error(ErrorCode.UNSUPPORTED_CURRENCY, f"{currency_code!r} is neither 116 (KHR) nor 840 (USD)")
    amount = _value(top, "54")
    if amount is not None:
        problem = _amount_problem(amount, currency)
        if problem is not None:
            raise _error(ErrorCode.TRANSACTION_AMOUNT_INVALID, problem)


def _check_merchant(top: dict[str, TlvField]) -> None:
    country = _check_present(_value(top, "58"), ErrorCode.COUNTRY_CODE_TAG_REQUIRED, "the country code (58)")
    _check_length(country, country_code_characters_max, ErrorCode.COUNTRY_CODE_LENGTH_INVALID, "the country code")
    name = _check_present(_value(top, "59"), ErrorCode.MERCHANT_NAME_REQUIRED, "the merchant name (59)")
    _check_length(name, merchant_name_characters_max, ErrorCode.MERCHANT_NAME_LENGTH_INVALID, "the merchant name")
    city = _check_present(_value(top, "60"), ErrorCode.MERCHANT_CITY_TAG_REQUIRED, "the merchant city (60)")
    _check_length(city, merchant_city_characters_max, ErrorCode.MERCHANT_CITY_LENGTH_INVALID, "the merchant city")


_additional_limits = (
    ("01", bill_number_characters_max, ErrorCode.BILL_NUMBER_LENGTH_INVALID, "the bill number (62.01)"),
    ("02", mobile_number_characters_max, ErrorCode.MOBILE_NUMBER_LENGTH_INVALID, "the mobile number (62.02)"),
    ("03", store_label_characters_max, ErrorCode.STORE_LABEL_LENGTH_INVALID, "the store label (62.03)"),
    ("07", terminal_label_characters_max, ErrorCode.TERMINAL_LABEL_LENGTH_INVALID, "the terminal label (62.07)"),
    ("08", purpose_characters_max, ErrorCode.PURPOSE_OF_TRANSACTION_LENGTH_INVALID, "the purpose (62.08)"),
)


def _check_additional(values: dict[str, str]) -> None:
    for subtag, limit, error, what in _additional_limits:
        value = values.get(subtag)
        if value is None:
            continue
        # The SDK reports an empty optional field as a length error: present means 1 character or more.
        if value == "":
            raise _error(error, f"{what} is present but empty")
        _check_length(value, limit, error, what)


def _check_language(values: dict[str, str]) -> None:
    # EMVCo makes 00 and 01 mandatory inside template 64; the SDK's generator requires them too.
    preference = values.get("00")
    if preference is None:
        raise _error(ErrorCode.LANGUAGE_PREFERENCE_REQUIRED, "template 64 has no language preference (00)")
    if len(preference) != language_preference_characters:
        raise _error(ErrorCode.LANGUAGE_PREFERENCE_LENGTH_INVALID, f"{preference!r} is not a 2-letter language code")
    name = values.get("01")
    if not name:
        raise _error(ErrorCode.MERCHANT_NAME_ALTERNATE_LANGUAGE_REQUIRED, "template 64 has no merchant name (01)")
    _check_length(
        name,
        merchant_name_alternate_language_characters_max,
        ErrorCode.MERCHANT_NAME_ALTERNATE_LANGUAGE_LENGTH_INVALID,
        "the alternate-language merchant name",
    )
    city = values.get("02")
    if city is not None:
        if city == "":
            raise _error(ErrorCode.MERCHANT_CITY_ALTERNATE_LANGUAGE_LENGTH_INVALID, "64.02 is present but empty")
        _check_length(
            city,
            merchant_city_alternate_language_characters_max,
            ErrorCode.MERCHANT_CITY_ALTERNATE_LANGUAGE_LENGTH_INVALID,
            "the alternate-language merchant city",
        )


def _check_timestamps(values: dict[str, str], now_ms: int) -> None:
    expires_text = values.get("01")
    if not expires_text:
        raise _error(ErrorCode.EXPIRATION_TIMESTAMP_REQUIRED, "template 99 has no expiration (01)")
    expires_ms = _timestamp_ms(expires_text)
    if expires_ms is None:
        raise _error(
            ErrorCode.EXPIRATION_TIMESTAMP_LENGTH_INVALID, f"{expires_text!r} is not {timestamp_digits} digits"
        )
    created_text = values.get("00")
    if created_text is not None:
        created_ms = _timestamp_ms(created_text)
        if created_ms is None:
            raise _error(
                ErrorCode.KHQR_INVALID, f"creation timestamp {created_text!r} is not {timestamp_digits} digits"
            )
        if expires_ms < created_ms:
            raise _error(
                ErrorCode.EXPIRATION_TIMESTAMP_IN_THE_PAST, f"expires at {expires_ms} ms, created at {created_ms} ms"
            )
    if expires_ms < now_ms:
        raise _error(ErrorCode.KHQR_EXPIRED, f"expired at {expires_ms} ms; it is now {now_ms} ms")


# Generate ----------------------------------------------------------------------------------------------


def generate(
    *,
    bakong_account_id: str,
    merchant_name: str,
    merchant_city: str,
    currency: str,
    amount_minor: int | None = None,
    created_ms: int | None = None,
    expires_ms: int | None = None,
    merchant_id: str | None = None,
    acquiring_bank: str | None = None,
    account_information: str | None = None,
    merchant_category_code: str = default_merchant_category_code,
    upi_merchant_account: str | None = None,
    bill_number: str | None = None,
    mobile_number: str | None = None,
    store_label: str | None = None,
    terminal_label: str | None = None,
    purpose: str | None = None,
    language_preference: str | None = None,
    merchant_name_alternate_language: str | None = None,
    merchant_city_alternate_language: str | None = None,
) -> str:
    """Build a KHQR: a merchant account (tag 30) when `merchant_id` is given, else an individual one (29).

    With `amount_minor` (riel for KHR, cents for USD) it is dynamic and needs `created_ms` and `expires_ms`
    (13-digit epoch milliseconds); without, it is static and carries no timestamps. Tags are emitted in
    ascending order with the CRC (63) last. Raises KhqrError with the SDK's code for a request it refuses.
    """
    currency_code = code_by_currency.get(currency)
    if currency_code is None:
        raise _error(ErrorCode.UNSUPPORTED_CURRENCY, f"{currency!r} is neither KHR nor USD")
    if merchant_id is not None and account_information is not None:
        raise _error(ErrorCode.KHQR_INVALID, "account information is for individual accounts (29), not merchants (30)")
    account = _subfield_list(
        ("00", bakong_account_id),
        ("01", merchant_id if merchant_id is not None else account_information),
        ("02", acquiring_bank),
    )
    fields = [
        TlvField("00", "01"),
        TlvField("01", _static if amount_minor is None else _dynamic),
        *_optional_field("15", upi_merchant_account),
        TlvField("30" if merchant_id is not None else "29", "", account),
        TlvField("52", merchant_category_code),
        TlvField("53", currency_code),
        *_amount_fields(amount_minor, currency),
        TlvField("58", "KH"),
        TlvField("59", merchant_name),
        TlvField("60", merchant_city),
        *_template_field(
            "62",
            ("01", bill_number),
            ("02", mobile_number),
            ("03", store_label),
            ("07", terminal_label),
            ("08", purpose),
        ),
        *_template_field(
            "64",
            ("00", language_preference),
            ("01", merchant_name_alternate_language),
            ("02", merchant_city_alternate_language),
        ),
        *_timestamp_fields(amount_minor, created_ms, expires_ms),
    ]
    # Every field rule runs before anything is encoded, so a too-long value gets its own error code
    # rather than the generic one for a TLV that cannot be written. A static KHQR has no expiry, so
    # the time compared against only matters for a dynamic one, whose creation time it is.
    _check_fields(tuple(fields), now_ms=created_ms if created_ms is not None else 0)
    # No payload-length check here: with every field at its limit and each template at 99 characters,
    # the longest KHQR this can build is 511 characters, inside payload_characters_max.
    body = "".join(_encode(field) for field in fields) + crc_field_prefix
    return body + crc16(body)


def _subfield_list(*pairs: tuple[str, str | None]) -> tuple[TlvField, ...]:
    return tuple(TlvField(tag, value) for tag, value in pairs if value is not None)


def _optional_field(tag: str, value: str | None) -> list[TlvField]:
    return [] if value is None else [TlvField(tag, value)]


def _template_field(tag: str, *pairs: tuple[str, str | None]) -> list[TlvField]:
    subfields = _subfield_list(*pairs)
    return [TlvField(tag, "", subfields)] if subfields else []


def _amount_fields(amount_minor: int | None, currency: str) -> list[TlvField]:
    if amount_minor is None:
        return []
    if amount_minor <= 0:
        raise _error(
            ErrorCode.TRANSACTION_AMOUNT_INVALID, f"{amount_minor} minor units; a dynamic KHQR needs more than 0"
        )
    return [TlvField("54", _amount_text(amount_minor, currency))]


def _timestamp_fields(amount_minor: int | None, created_ms: int | None, expires_ms: int | None) -> list[TlvField]:
    if amount_minor is None:
        if created_ms is not None or expires_ms is not None:
            raise _error(ErrorCode.KHQR_INVALID, "a static KHQR (no amount) carries no timestamps")
        return []
    if expires_ms is None:
        raise _error(ErrorCode.EXPIRATION_TIMESTAMP_REQUIRED, "a dynamic KHQR needs expires_ms")
    if created_ms is None:
        raise _error(ErrorCode.KHQR_INVALID, "a dynamic KHQR needs created_ms")
    # Never zero-padded: padding would forge a 13-digit field out of a wrong number, which unpadded
    # fails the field check instead.
    subfields = (TlvField("00", str(created_ms)), TlvField("01", str(expires_ms)))
    return [TlvField("99", "", subfields)]
