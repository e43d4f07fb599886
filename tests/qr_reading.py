"""Test helpers that read QR codes back from the PNG and SVG receipts render (zxing-cpp, test-only)."""

from __future__ import annotations

import re
import struct
import zlib
from xml.etree import ElementTree

import zxingcpp


def png_luminance(png: bytes) -> tuple[int, int, bytes]:
    """The pixels of a 1-bit greyscale PNG (what segno writes), one byte per pixel, with the stdlib only."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    position, compressed, header = 8, b"", None
    while True:
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind = png[position + 4 : position + 8]
        data = png[position + 8 : position + 8 + length]
        (checksum,) = struct.unpack(">I", png[position + 8 + length : position + 12 + length])
        assert zlib.crc32(kind + data) == checksum
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            compressed += data
        elif kind == b"IEND":
            break
        position += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    assert (depth, colour_type, interlace) == (1, 0, 0)
    raw = zlib.decompress(compressed)
    stride = (width + 7) // 8
    previous = bytes(stride)
    pixels = bytearray()
    for row in range(height):
        start = row * (stride + 1)
        filter_type, line = raw[start], raw[start + 1 : start + 1 + stride]
        assert filter_type in (0, 2)  # None and Up: the two filters segno uses
        if filter_type == 2:
            line = bytes((value + above) & 0xFF for value, above in zip(line, previous, strict=True))
        previous = line
        pixels += bytes(255 if line[x >> 3] >> (7 - (x & 7)) & 1 else 0 for x in range(width))
    return width, height, bytes(pixels)


svg_namespace = "{http://www.w3.org/2000/svg}"


def svg_luminance(svg: str, pixels_per_module: int) -> tuple[int, int, bytes]:
    """Rasterise segno's SVG (a background square, then one path of horizontal runs of dark modules)."""
    root = ElementTree.fromstring(svg.encode("utf-8"))
    assert root.tag == f"{svg_namespace}svg"
    background, runs = root.find(f"{svg_namespace}g").findall(f"{svg_namespace}path")
    size = int(re.fullmatch(r"M0 0h(\d+)v\1h-\1z", background.get("d")).group(1))
    modules = [[255] * size for _ in range(size)]
    x = y = 0.0
    for command, first, second in re.findall(r"([Mmh])(-?[\d.]+)(?: (-?[\d.]+))?", runs.get("d")):
        if command == "M":
            x, y = float(first), float(second)
        elif command == "m":
            x, y = x + float(first), y + float(second)
        else:
            for column in range(int(x), int(x + float(first))):
                modules[int(y)][column] = 0
            x += float(first)
    pixels = b"".join(
        bytes(value for value in row for _ in range(pixels_per_module)) * pixels_per_module for row in modules
    )
    return size * pixels_per_module, size * pixels_per_module, pixels


def read_qr_text(width: int, height: int, pixels: bytes) -> str:
    image = memoryview(pixels).cast("B", shape=[height, width])
    codes = zxingcpp.read_barcodes(image, formats=zxingcpp.BarcodeFormat.QRCode, text_mode=zxingcpp.TextMode.Plain)
    assert len(codes) == 1
    return codes[0].text
