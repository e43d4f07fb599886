"""`tonle` commands for ledger operations on a local network: transfers (two-phase, linked, exchange),
issue and redeem, accounts, institutions, aliases, and the queries (balance, history, lookup)."""

from __future__ import annotations

import argparse
from typing import Any

from config.keys import load_signing_key
from consensus.entries import (
    AccountFlags,
    AdmitInstitution,
    Body,
    CloseAccount,
    FreezeAccount,
    Issue,
    OpenAccount,
    Redeem,
    RegisterAlias,
    ReinstateInstitution,
    RotateKey,
    SetKycTier,
    SuspendInstitution,
    Transfer,
    TransferFlags,
    UnfreezeAccount,
    UnregisterAlias,
    institution_roles,
    kyc_tiers,
)
from node.cli_support import (
    cluster_of,
    exit_code_failure,
    non_negative,
    pick_node,
    positive,
    print_json,
    transfer_id_argument,
)
from node.client import new_transfer_id
from node.cluster import ClusterError, LocalCluster
from storage.records import settlement_account

_success = ("ok", "exists")


def _owner(account: str) -> str:
    return account.rpartition("@")[2]


def _submit(cluster: LocalCluster, node: str | None, signed: list[tuple[Body, str]]) -> int:
    """Sign each body as its signer, submit them together, print the outcomes; 0 if every one succeeded."""
    entries = [cluster.sign(body, signer) for body, signer in signed]
    with cluster.client(pick_node(cluster, node)) as client:
        results = client.submit(entries)
    documents = []
    for (body, _signer), result in zip(signed, results, strict=True):
        document: dict[str, Any] = {"kind": body.kind.name.lower(), **result}
        if hasattr(body, "id"):
            document["id"] = body.id
        documents.append(document)
    print_json(documents[0] if len(documents) == 1 else documents)
    return 0 if all(r["status"] == "applied" and r["result"] in _success for r in results) else exit_code_failure


# Transfers --------------------------------------------------------------------------------------------


def command_transfer(arguments: argparse.Namespace) -> int:
    flags = TransferFlags.NONE
    if arguments.pending:
        flags |= TransferFlags.PENDING
    if arguments.balancing == "debit":
        flags |= TransferFlags.BALANCING_DEBIT
    elif arguments.balancing == "credit":
        flags |= TransferFlags.BALANCING_CREDIT
    body = Transfer(
        arguments.id or new_transfer_id(),
        arguments.from_account,
        arguments.to_account,
        arguments.amount,
        arguments.currency,
        flags=int(flags),
        timeout_seconds=arguments.timeout,
        reference=arguments.reference,
        code=arguments.code,
    )
    return _submit(cluster_of(arguments), arguments.node, [(body, _owner(arguments.from_account))])


def command_resolve(arguments: argparse.Namespace) -> int:
    """Post or void a pending transfer, signed by the owner of its debit account."""
    cluster = cluster_of(arguments)
    with cluster.client(pick_node(cluster, arguments.node)) as client:
        pending = client.lookup_transfer(arguments.pending_id)
    if pending is None or "debit_account" not in pending:
        raise ClusterError(f"no transfer {arguments.pending_id.hex()} on this network")
    flag = TransferFlags.POST_PENDING if arguments.action == "post" else TransferFlags.VOID_PENDING
    amount = arguments.amount if arguments.action == "post" else 0
    body = Transfer(arguments.id or new_transfer_id(), "", "", amount, "", flags=int(flag), pending_id=arguments.pending_id)
    return _submit(cluster, arguments.node, [(body, _owner(pending["debit_account"]))])


def _leg(text: str) -> tuple[str, str, int, str]:
    parts = text.split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError("a leg is FROM,TO,AMOUNT,CURRENCY")
    return parts[0], parts[1], positive(parts[2]), parts[3]


def command_chain(arguments: argparse.Namespace) -> int:
    """Linked transfers that apply all or nothing; each leg signed by its debit account's owner."""
    legs = arguments.leg
    signed = []
    for position, (debit, credit, amount, currency) in enumerate(legs):
        flags = TransferFlags.LINKED if position < len(legs) - 1 else TransferFlags.NONE
        signed.append((Transfer(new_transfer_id(), debit, credit, amount, currency, flags=int(flags)), _owner(debit)))
    return _submit(cluster_of(arguments), arguments.node, signed)


def _rate(text: str) -> tuple[int, int]:
    numerator, _, denominator = text.partition("/")
    try:
        values = int(numerator), int(denominator or "1")
    except ValueError:
        raise argparse.ArgumentTypeError("a rate is NUMERATOR/DENOMINATOR in minor units, e.g. 1/4100") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError("both terms of a rate must be positive")
    return values


def command_exchange(arguments: argparse.Namespace) -> int:
    """Currency exchange through a provider's settlement accounts: a linked pair of legs. The second leg is
    signed by the provider and carries the rate, so the amounts are exactly what both sides signed."""
    cluster = cluster_of(arguments)
    with cluster.client(pick_node(cluster, arguments.node)) as client:
        source = client.balance(arguments.from_account)
        target = client.balance(arguments.to_account)
    if source is None or target is None:
        raise ClusterError("both accounts must exist")
    numerator, denominator = arguments.rate
    provider = arguments.provider
    bought = arguments.amount * numerator // denominator
    first = Transfer(new_transfer_id(), arguments.from_account, settlement_account(provider, source["currency"]),
                     arguments.amount, source["currency"], flags=int(TransferFlags.LINKED))
    second = Transfer(new_transfer_id(), settlement_account(provider, target["currency"]), arguments.to_account, bought,
                      target["currency"], rate_numerator=numerator, rate_denominator=denominator)
    return _submit(cluster, arguments.node, [(first, _owner(arguments.from_account)), (second, provider)])


def command_issue(arguments: argparse.Namespace) -> int:
    cluster = cluster_of(arguments)
    body = Issue(new_transfer_id(), arguments.to_account, arguments.amount, arguments.currency)
    return _submit(cluster, arguments.node, [(body, cluster.central_bank())])


def command_redeem(arguments: argparse.Namespace) -> int:
    cluster = cluster_of(arguments)
    body = Redeem(new_transfer_id(), arguments.from_account, arguments.amount, arguments.currency)
    return _submit(cluster, arguments.node, [(body, cluster.central_bank())])


# Accounts ---------------------------------------------------------------------------------------------

_limit_flags = {
    "debits": AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS,
    "credits": AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS,
    "none": AccountFlags.NONE,
}


def command_account(arguments: argparse.Namespace) -> int:
    cluster = cluster_of(arguments)
    account = arguments.account
    action = arguments.action
    if action == "open":
        body: Body = OpenAccount(
            account, arguments.currency, flags=int(_limit_flags[arguments.limit]), code=arguments.code,
            user_data=bytes.fromhex(arguments.user_data), tier=arguments.tier,
        )
        signer = _owner(account)
    elif action == "close":
        body, signer = CloseAccount(account), _owner(account)
    elif action == "tier":
        body, signer = SetKycTier(account, arguments.tier), _owner(account)
    elif action == "freeze":
        body, signer = FreezeAccount(account), cluster.central_bank()
    else:
        body, signer = UnfreezeAccount(account), cluster.central_bank()
    return _submit(cluster, arguments.node, [(body, signer)])


# Institutions -----------------------------------------------------------------------------------------


def command_institution(arguments: argparse.Namespace) -> int:
    cluster = cluster_of(arguments)
    institution = arguments.institution
    action = arguments.action
    if action == "show":
        with cluster.client(pick_node(cluster, arguments.node)) as client:
            record = client.institution(institution)
        print_json(record if record is not None else {"institution": institution, "found": False})
        return 0 if record is not None else exit_code_failure
    if action == "admit":
        key_file = cluster.new_institution_key(institution, arguments.name, arguments.role)
        body: Body = AdmitInstitution(institution, arguments.name, arguments.role, bytes(load_signing_key(key_file).verify_key))
        return _submit(cluster, arguments.node, [(body, cluster.central_bank())])
    if action == "rotate-key":
        old_key = cluster.institution_key(institution)
        new_key_file = cluster.next_institution_key(institution)
        body = RotateKey(institution, bytes(load_signing_key(new_key_file).verify_key))
        entry = cluster.sign(body, institution)  # signed with the current key
        with cluster.client(pick_node(cluster, arguments.node)) as client:
            (result,) = client.submit([entry])
        if result["status"] == "applied" and result["result"] == "ok":
            cluster.adopt_institution_key(institution, new_key_file)
        print_json({"kind": "rotate_key", "old_public_key": bytes(old_key.verify_key), **result})
        return 0 if result["result"] == "ok" else exit_code_failure
    body = SuspendInstitution(institution) if action == "suspend" else ReinstateInstitution(institution)
    return _submit(cluster, arguments.node, [(body, cluster.central_bank())])


# Aliases ----------------------------------------------------------------------------------------------


def command_alias(arguments: argparse.Namespace) -> int:
    cluster = cluster_of(arguments)
    if arguments.action == "show":
        with cluster.client(pick_node(cluster, arguments.node)) as client:
            record = client.alias(arguments.alias)
        print_json(record if record is not None else {"alias": arguments.alias, "found": False})
        return 0 if record is not None else exit_code_failure
    if arguments.action == "register":
        return _submit(cluster, arguments.node, [(RegisterAlias(arguments.alias, arguments.account), _owner(arguments.account))])
    with cluster.client(pick_node(cluster, arguments.node)) as client:
        record = client.alias(arguments.alias)
    if record is None:
        raise ClusterError(f"alias {arguments.alias} is not registered")
    return _submit(cluster, arguments.node, [(UnregisterAlias(arguments.alias), _owner(record["account"]))])


# Queries ----------------------------------------------------------------------------------------------


def command_balance(arguments: argparse.Namespace) -> int:
    cluster = cluster_of(arguments)
    with cluster.client(pick_node(cluster, arguments.node)) as client:
        balance = client.balance(arguments.account, arguments.as_of)
    print_json(balance if balance is not None else {"account": arguments.account, "found": False})
    return 0 if balance is not None else exit_code_failure


def command_history(arguments: argparse.Namespace) -> int:
    cluster = cluster_of(arguments)
    filters = {"start_ms": arguments.start_ms, "end_ms": arguments.end_ms, "limit": arguments.limit, "cursor": arguments.cursor}
    with cluster.client(pick_node(cluster, arguments.node)) as client:
        history = client.history(arguments.account, **filters)
    print_json(history if history is not None else {"account": arguments.account, "found": False})
    return 0 if history is not None else exit_code_failure


def command_lookup(arguments: argparse.Namespace) -> int:
    cluster = cluster_of(arguments)
    with cluster.client(pick_node(cluster, arguments.node)) as client:
        if arguments.id is not None:
            found = client.lookup_transfer(arguments.id)
            print_json(found if found is not None else {"id": arguments.id, "found": False})
            return 0 if found is not None else exit_code_failure
        transfers = client.transfers_by_reference(arguments.reference, arguments.limit)
    print_json(transfers)
    return 0 if transfers else exit_code_failure


# Parser -----------------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", required=True, help="the local network's directory (holds cluster.json and keys)")
    parser.add_argument("--node", help="node to send to (default: the first running node)")


def add_ledger_commands(commands: argparse._SubParsersAction) -> None:
    transfer = commands.add_parser("transfer", help="sign (as the debtor's institution) and submit a transfer")
    _common(transfer)
    transfer.add_argument("--from", dest="from_account", required=True, help="account id or E.164 alias")
    transfer.add_argument("--to", dest="to_account", required=True, help="account id or E.164 alias")
    transfer.add_argument("--amount", type=positive, required=True, help="in minor units (riel, cents)")
    transfer.add_argument("--currency", required=True)
    transfer.add_argument("--id", type=transfer_id_argument, help="128-bit id in hex (default: a new time-ordered id)")
    transfer.add_argument("--pending", action="store_true", help="reserve the amount; post or void it later")
    transfer.add_argument("--timeout", type=non_negative, default=0, help="seconds until a pending transfer expires")
    transfer.add_argument("--balancing", choices=("debit", "credit"), help="move at most --amount, as the limit allows")
    transfer.add_argument("--reference", default="", help="bill number, KHQR hash or external reference (64 chars)")
    transfer.add_argument("--code", type=non_negative, default=0, help="transfer code (0..65535)")
    transfer.set_defaults(handler=command_transfer)

    for action, text in (("post", "post (all or part of) a pending transfer"), ("void", "void a pending transfer")):
        resolve = commands.add_parser(action, help=text)
        _common(resolve)
        resolve.add_argument("--pending-id", type=transfer_id_argument, required=True)
        if action == "post":
            resolve.add_argument("--amount", type=non_negative, default=0, help="default: the whole pending amount")
        resolve.add_argument("--id", type=transfer_id_argument)
        resolve.set_defaults(handler=command_resolve, action=action)

    chain = commands.add_parser("chain", help="linked transfers that apply all or nothing")
    _common(chain)
    chain.add_argument("--leg", type=_leg, action="append", required=True, help="FROM,TO,AMOUNT,CURRENCY (repeat, in order)")
    chain.set_defaults(handler=command_chain)

    exchange = commands.add_parser("exchange", help="convert between currencies through an FX provider")
    _common(exchange)
    exchange.add_argument("--from", dest="from_account", required=True)
    exchange.add_argument("--to", dest="to_account", required=True)
    exchange.add_argument("--amount", type=positive, required=True, help="what leaves --from, in its minor units")
    exchange.add_argument("--rate", type=_rate, required=True, help="minor units bought per minor unit sold, e.g. 1/41")
    exchange.add_argument("--provider", required=True, help="institution whose settlement accounts make the exchange")
    exchange.set_defaults(handler=command_exchange)

    issue = commands.add_parser("issue", help="the central bank credits a settlement account with new money")
    _common(issue)
    issue.add_argument("--to", dest="to_account", required=True)
    issue.add_argument("--amount", type=positive, required=True)
    issue.add_argument("--currency", required=True)
    issue.set_defaults(handler=command_issue)

    redeem = commands.add_parser("redeem", help="the central bank takes money back from a settlement account")
    _common(redeem)
    redeem.add_argument("--from", dest="from_account", required=True)
    redeem.add_argument("--amount", type=positive, required=True)
    redeem.add_argument("--currency", required=True)
    redeem.set_defaults(handler=command_redeem)

    account = commands.add_parser("account", help="open, close, freeze, unfreeze an account or set its KYC tier")
    account_actions = account.add_subparsers(dest="action", required=True, metavar="ACTION")
    opening = account_actions.add_parser("open")
    _common(opening)
    opening.add_argument("--account", required=True)
    opening.add_argument("--currency", required=True)
    opening.add_argument("--tier", choices=kyc_tiers, default="basic")
    opening.add_argument("--limit", choices=tuple(_limit_flags), default="debits", help="which side may not exceed the other")
    opening.add_argument("--code", type=non_negative, default=0)
    opening.add_argument("--user-data", default="", help="up to 32 bytes, hex")
    for action in ("close", "freeze", "unfreeze", "tier"):
        sub = account_actions.add_parser(action)
        _common(sub)
        sub.add_argument("--account", required=True)
        if action == "tier":
            sub.add_argument("--tier", choices=kyc_tiers, required=True)
    account.set_defaults(handler=command_account)

    institution = commands.add_parser("institution", help="admit, suspend, reinstate an institution or rotate its key")
    institution_actions = institution.add_subparsers(dest="action", required=True, metavar="ACTION")
    admit = institution_actions.add_parser("admit", help="writes DIR/keys/ID.key for the new institution")
    _common(admit)
    admit.add_argument("--id", dest="institution", required=True)
    admit.add_argument("--name", required=True)
    admit.add_argument("--role", choices=institution_roles, default="bank")
    for action in ("suspend", "reinstate", "rotate-key", "show"):
        sub = institution_actions.add_parser(action)
        _common(sub)
        sub.add_argument("--id", dest="institution", required=True)
    institution.set_defaults(handler=command_institution)

    alias = commands.add_parser("alias", help="phone-number aliases for accounts")
    alias_actions = alias.add_subparsers(dest="action", required=True, metavar="ACTION")
    register = alias_actions.add_parser("register")
    _common(register)
    register.add_argument("--alias", required=True, help="E.164, e.g. +85512345678")
    register.add_argument("--account", required=True)
    for action in ("unregister", "show"):
        sub = alias_actions.add_parser(action)
        _common(sub)
        sub.add_argument("--alias", required=True)
    alias.set_defaults(handler=command_alias)

    balance = commands.add_parser("balance", help="an account's balance, now or as of an applied index")
    _common(balance)
    balance.add_argument("account", help="account id or E.164 alias")
    balance.add_argument("--as-of", type=non_negative, help="applied Raft index")
    balance.set_defaults(handler=command_balance)

    history = commands.add_parser("history", help="an account's transfers, newest first, with the balance after each")
    _common(history)
    history.add_argument("account")
    history.add_argument("--start-ms", type=non_negative, help="cluster time, ms since the epoch")
    history.add_argument("--end-ms", type=non_negative)
    history.add_argument("--limit", type=positive, default=20)
    history.add_argument("--cursor", type=bytes.fromhex, help="from the previous page's output")
    history.set_defaults(handler=command_history)

    lookup = commands.add_parser("lookup", help="a transfer by id, or the transfers with a reference")
    _common(lookup)
    which = lookup.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=transfer_id_argument)
    which.add_argument("--reference")
    lookup.add_argument("--limit", type=positive, default=100)
    lookup.set_defaults(handler=command_lookup)
