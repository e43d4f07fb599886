"""Reads which pages the newest commit of an LMDB environment freed, from its data file's free-page B-tree.

Why. LMDB writes every page a transaction changes to another place in the file and records the page it
replaced under the transaction's id in its free-page database. The replaced copy stays in the page cache
looking as recently used as the live page (it was just read to be copied), so a node whose memory is limited
keeps dead copies while it reads live account pages back from disk (README, "Memory under a limit"). The
node drops the copies its last commit left (node/page_aging.py); this module only finds them.

LMDB exposes no call for this, so the pages are read from the file in the layout of LMDB 0.9 on a 64-bit
little-endian machine (lmdb.h, mdb.c: MDB_meta, MDB_page, MDB_node). The layout is checked as it is read
(magic, version, page numbers inside the file, page kinds, sizes) and anything unexpected raises
FreePagesUnreadable: a caller can only lose the optimisation, never read a wrong page number silently.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass

_page_header_bytes = 16  # PAGEHDRSZ: pgno (8), pad (2), flags (2), lower and upper (2 + 2) or overflow pages (4)
_node_header_bytes = 8  # NODESIZE: lo, hi, flags, key size (2 each)
_meta_magic = 0xBEEFC0DE  # MDB_MAGIC
_data_version = 1  # MDB_DATA_VERSION of LMDB 0.9
_invalid_page = 0xFFFF_FFFF_FFFF_FFFF  # P_INVALID: the root of an empty tree
_page_branch = 0x01  # P_BRANCH
_page_leaf = 0x02  # P_LEAF
_page_overflow = 0x04  # P_OVERFLOW
_page_meta = 0x08  # P_META
_node_big_data = 0x01  # F_BIGDATA: the value is in overflow pages, the node holds their first page number
free_tree_depth_max = 16  # levels walked before the tree is called corrupt (a billion records need five)
freed_pages_per_commit_max = 1 << 22  # page numbers read from one record (32 MiB of them) before it is refused

_meta = struct.Struct("<IIQQ")  # magic, version, address, map size
_free_tree = struct.Struct("<IHHQQQQQ")  # MDB_db of the free-page database: pad (page size), flags, depth, ..., root
_meta_tail = struct.Struct("<QQ")  # last page number used, transaction id
_meta_free_tree_offset = _page_header_bytes + _meta.size
_meta_tail_offset = _meta_free_tree_offset + 2 * _free_tree.size
_page_header = struct.Struct("<QHHHH")
_node_header = struct.Struct("<HHHH")
_u64 = struct.Struct("<Q")


class FreePagesUnreadable(RuntimeError):
    """The data file is not in the layout this module reads (another LMDB version or a machine it does not
    know), or changed while it was read."""


@dataclass(frozen=True, slots=True)
class FreedPages:
    """The pages transaction `transaction_id` freed (its dead copies), and the file's page count then."""

    transaction_id: int
    pages: tuple[int, ...]
    pages_in_file: int


def layout_is_known() -> bool:
    """Whether this machine stores LMDB's on-disk integers as this module reads them."""
    return sys.byteorder == "little" and sys.maxsize > 2**32


def freed_by_newest_commit(descriptor: int, page_bytes: int) -> FreedPages:
    """The pages the newest committed write transaction of the data file open at `descriptor` freed.

    Read with pread, so it needs no mapping and no transaction; call it from the environment's only writer
    between its write transactions, or the newest commit may change under it (FreePagesUnreadable then, or
    the copies of a later commit: dropping either is only a lost page-cache hit, never a wrong read)."""
    if not layout_is_known():
        raise FreePagesUnreadable("LMDB's free-page layout is read only on 64-bit little-endian machines")
    if page_bytes < 512 or page_bytes & (page_bytes - 1):
        raise FreePagesUnreadable(f"page size {page_bytes} is not a power of two of at least 512")
    metas = [_read_meta(descriptor, number, page_bytes) for number in (0, 1)]
    transaction_id, root, depth, last_page = max(metas)
    pages_in_file = last_page + 1
    if root == _invalid_page:
        return FreedPages(transaction_id, (), pages_in_file)
    reader = _TreeReader(descriptor, page_bytes, pages_in_file)
    page = reader.page(root)
    for _ in range(free_tree_depth_max):
        flags = _flags(page)
        if flags & _page_leaf:
            break
        if not flags & _page_branch:
            raise FreePagesUnreadable(f"free-page tree page {_page_number(page)} is neither branch nor leaf")
        # Keys are transaction ids in integer order: the newest is down the rightmost edge.
        low, high, flag_bits, _ = reader.last_node(page)
        page = reader.page(low | high << 16 | flag_bits << 32)
    else:
        raise FreePagesUnreadable(f"free-page tree deeper than {free_tree_depth_max} levels (stated depth {depth})")
    position = reader.last_node_position(page)
    low, high, flag_bits, key_bytes = _node_header.unpack_from(page, position)
    key_at = position + _node_header_bytes
    if key_bytes != _u64.size or key_at + key_bytes > page_bytes:
        raise FreePagesUnreadable(f"free-page record key of {key_bytes} bytes, not a transaction id")
    (newest_key,) = _u64.unpack_from(page, key_at)
    if newest_key != transaction_id:
        return FreedPages(transaction_id, (), pages_in_file)  # the newest commit freed nothing
    value_bytes = low | high << 16
    value_at = key_at + key_bytes
    if flag_bits & _node_big_data:
        if value_at + _u64.size > page_bytes:
            raise FreePagesUnreadable(f"free-page record on page {_page_number(page)} runs past its end")
        (first,) = _u64.unpack_from(page, value_at)
        value = reader.overflow_value(first, value_bytes)
    else:
        if value_at + value_bytes > page_bytes:
            raise FreePagesUnreadable(f"free-page record on page {_page_number(page)} runs past its end")
        value = page[value_at : value_at + value_bytes]
    return FreedPages(transaction_id, _page_list(value, pages_in_file), pages_in_file)


def _read_meta(descriptor: int, number: int, page_bytes: int) -> tuple[int, int, int, int]:
    raw = os.pread(descriptor, _meta_tail_offset + _meta_tail.size, number * page_bytes)
    if len(raw) < _meta_tail_offset + _meta_tail.size:
        raise FreePagesUnreadable(f"meta page {number} is cut short")
    _, _, flags, _, _ = _page_header.unpack_from(raw, 0)
    magic, version, _, _ = _meta.unpack_from(raw, _page_header_bytes)
    if not flags & _page_meta or magic != _meta_magic or version != _data_version:
        raise FreePagesUnreadable(f"meta page {number}: flags {flags:#x}, magic {magic:#x}, version {version}")
    stated_page_bytes, _, depth, _, _, _, _, root = _free_tree.unpack_from(raw, _meta_free_tree_offset)
    if stated_page_bytes != page_bytes:
        raise FreePagesUnreadable(f"meta page {number} states pages of {stated_page_bytes} bytes, not {page_bytes}")
    last_page, transaction_id = _meta_tail.unpack_from(raw, _meta_tail_offset)
    return transaction_id, root, depth, last_page


def _flags(page: bytes) -> int:
    return _page_header.unpack_from(page, 0)[2]


def _page_number(page: bytes) -> int:
    return _page_header.unpack_from(page, 0)[0]


def _page_list(value: bytes, pages_in_file: int) -> tuple[int, ...]:
    """An LMDB ID list: a count, then that many page numbers."""
    if len(value) < _u64.size or len(value) % _u64.size:
        raise FreePagesUnreadable(f"free-page list of {len(value)} bytes")
    (count,) = _u64.unpack_from(value, 0)
    if count > freed_pages_per_commit_max or (count + 1) * _u64.size != len(value):
        raise FreePagesUnreadable(f"free-page list states {count} pages in {len(value)} bytes")
    pages = struct.unpack_from(f"<{count}Q", value, _u64.size)
    # Pages 0 and 1 are the meta pages, never freed.
    if pages and not all(2 <= page < pages_in_file for page in (min(pages), max(pages))):
        raise FreePagesUnreadable(f"freed page numbers {min(pages)}..{max(pages)} outside the file's {pages_in_file} pages")
    return pages


class _TreeReader:
    """Reads pages of one data file, checking each is the page it should be."""

    def __init__(self, descriptor: int, page_bytes: int, pages_in_file: int) -> None:
        self._descriptor = descriptor
        self._page_bytes = page_bytes
        self._pages_in_file = pages_in_file

    def page(self, number: int) -> bytes:
        if not 2 <= number < self._pages_in_file:
            raise FreePagesUnreadable(f"page number {number} outside the file's {self._pages_in_file} pages")
        raw = os.pread(self._descriptor, self._page_bytes, number * self._page_bytes)
        if len(raw) != self._page_bytes or _page_number(raw) != number:
            raise FreePagesUnreadable(f"page {number} does not hold itself (changed while read, or not LMDB's)")
        return raw

    def last_node_position(self, page: bytes) -> int:
        _, _, _, lower, _ = _page_header.unpack_from(page, 0)
        keys = (lower - _page_header_bytes) >> 1
        if keys < 1 or lower > self._page_bytes:
            raise FreePagesUnreadable(f"page {_page_number(page)} holds {keys} keys")
        (position,) = struct.unpack_from("<H", page, _page_header_bytes + 2 * (keys - 1))
        if not lower <= position <= self._page_bytes - _node_header_bytes:
            raise FreePagesUnreadable(f"page {_page_number(page)}: node at {position}, outside its data")
        return position

    def last_node(self, page: bytes) -> tuple[int, int, int, int]:
        return _node_header.unpack_from(page, self.last_node_position(page))

    def overflow_value(self, first: int, value_bytes: int) -> bytes:
        head = self.page(first)
        if not _flags(head) & _page_overflow:
            raise FreePagesUnreadable(f"page {first} should start an overflow run")
        (run_pages,) = struct.unpack_from("<I", head, 12)
        if run_pages * self._page_bytes < _page_header_bytes + value_bytes or first + run_pages > self._pages_in_file:
            raise FreePagesUnreadable(f"overflow run of {run_pages} pages at {first} for {value_bytes} bytes")
        raw = os.pread(self._descriptor, _page_header_bytes + value_bytes, first * self._page_bytes)
        if len(raw) != _page_header_bytes + value_bytes:
            raise FreePagesUnreadable(f"overflow run at {first} cut short")
        return raw[_page_header_bytes:]
