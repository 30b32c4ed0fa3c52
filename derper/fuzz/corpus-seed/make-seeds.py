#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into corpus-seed/<target>/.

Inputs follow each target's documented layout (see the target's header comment); the byte
strings come from the spec's test vectors (shared/docs/derp-protocol.md §5.6, §7.3) and the
unit tests. Re-run after changing a layout: python3 corpus-seed/make-seeds.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# spec §5.6 test vectors (server key 0002…1f60, client key 2022…3f40, fixed nonces).
SERVER_KEY_FRAME = bytes.fromhex(
    "010000002844455250f09f949107a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c")
CLIENT_INFO_FRAME = bytes.fromhex(
    "02000000685869aff450549732cbaaed5e5df9b30a6da31cb0e5742bad5ad4a1a768f1a67b"
    "6465666768696a6b6c6d6e6f707172737475767778797a7b"
    "cba66775b0b5b0964c138cc2d6b011d9"
    "8517d9971faac8afed66fcfa4e109c714c76dbad4dcd2235388a0557b5cd384c")
SERVER_INFO_FRAME = bytes.fromhex(
    "0300000035c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf"
    "cd3843f659d9fb5b5516ab933ad12215"
    "8e086eaf89d049e7450ca2975f")
# spec §7.3
STUN_REQUEST = bytes.fromhex(
    "000100142112a4420102030405060708090a0b0c802200087461696c6e6f646580280004b32c370f")
CLIENT_PUB = CLIENT_INFO_FRAME[5:37]


def frame(typ, payload):
    return struct.pack(">BI", typ, len(payload)) + payload


def stream(flags, plan, data):
    return bytes([flags, len(plan)]) + bytes(plan) + data


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


K1, K2 = bytes([1]) * 32, bytes([2]) * 32
client_frames = (CLIENT_INFO_FRAME + frame(0x04, K1 + b"hello") + frame(0x07, b"\x01")
                 + frame(0x12, b"pingpong") + frame(0x06, b"") + frame(0x10, b"")
                 + frame(0x11, K2) + frame(0x0a, K1 + K2 + b"fwd") + frame(0x13, b"12345678"))
v4mapped = bytes(10) + b"\xff\xff" + bytes([203, 0, 113, 5])
server_frames = (SERVER_KEY_FRAME + SERVER_INFO_FRAME + frame(0x05, K1 + b"data")
                 + frame(0x09, K2 + v4mapped + struct.pack(">HB", 41641, 1)) + frame(0x09, K2)
                 + frame(0x08, K1 + b"\x01") + frame(0x15, struct.pack(">II", 1000, 30000))
                 + frame(0x14, b"unhealthy") + frame(0x12, b"12345678") + frame(0x06, b""))

# fuzz_frames: [flags][n][plan][stream]
write("fuzz_frames", "client-frames", stream(0, [], client_frames))
write("fuzz_frames", "client-frames-chunked", stream(0, [1, 0, 7, 0xf0, 3], client_frames))
write("fuzz_frames", "client-frames-pipelined", stream(2 | (20 << 3), [5], client_frames))
write("fuzz_frames", "client-frames-rate-limited", stream(4, [3, 0, 200], client_frames))
write("fuzz_frames", "skipped-rate-limited", stream(4, [], struct.pack(">BI", 0x20, 70000) + bytes(100)))
write("fuzz_frames", "server-frames", stream(1, [], server_frames))
write("fuzz_frames", "server-frames-chunked", stream(1, [2, 0, 64], server_frames))
write("fuzz_frames", "skipped-unknown", stream(0, [0xf1], struct.pack(">BI", 0x20, 70000) + bytes(100)))
write("fuzz_frames", "oversize-send", stream(0, [], struct.pack(">BI", 0x04, 32 + 65537) + K1))
write("fuzz_frames", "truncated", stream(0, [], frame(0x12, b"12345678")[:9]))

# fuzz_http_head: [flags][n][plan][stream]
go_fast = (b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1:443\r\nUser-Agent: Go-http-client/1.1\r\n"
           b"Connection: Upgrade\r\nDerp-Fast-Start: 1\r\nUpgrade: DERP\r\n\r\n")
go_plain = (b"GET /derp HTTP/1.1\r\nHost: derp.example.com\r\nConnection: Upgrade\r\n"
            b"Upgrade: DERP\r\n\r\n")
ws = (b"GET /derp HTTP/1.1\r\nHost: derp.example.com\r\nUpgrade: websocket\r\n"
      b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
      b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: derp\r\n\r\n")
write("fuzz_http_head", "derp-fast-start", stream(0, [], go_fast + CLIENT_INFO_FRAME))
write("fuzz_http_head", "derp-101", stream(0, [17, 0, 5], go_plain + CLIENT_INFO_FRAME))
write("fuzz_http_head", "derp-registered", stream(4, [], go_fast + frame(0x04, CLIENT_PUB + b"to self")
                                                 + frame(0x04, K1 + b"nobody") + frame(0x07, b"\x01")
                                                 + frame(0x12, b"pingping")))
write("fuzz_http_head", "derp-mesh", stream(4 | 8, [], go_fast + frame(0x10, b"") + frame(0x0a, K1 + CLIENT_PUB + b"fw")
                                           + frame(0x11, K1) + frame(0x11, CLIENT_PUB)))
write("fuzz_http_head", "derp-rate-limited", stream(4 | 16, [], go_fast + frame(0x04, K1 + bytes(2000)) + frame(0x12, b"pingping")))
write("fuzz_http_head", "websocket", stream(0, [], ws + bytes([0x82, 0x85, 1, 2, 3, 4]) + b"abcde"))
write("fuzz_http_head", "websocket-raw-derp", stream(0, [], ws.replace(b"Sec-WebSocket-Protocol: derp\r\n", b"")))
for name, req in [
        ("probe", b"GET /derp/probe HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("latency-check", b"HEAD /derp/latency-check HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("generate-204", b"GET /generate_204 HTTP/1.1\r\nHost: a\r\nX-Tailscale-Challenge: ts_203.0.113.5\r\n\r\n"),
        ("home", b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /robots.txt HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("bootstrap-dns", b"GET /bootstrap-dns?q=example.com HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("connect", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
        ("derp-no-upgrade", b"GET /derp HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("keepalive-derp", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" + go_plain)]:
    write("fuzz_http_head", name, stream(0, [], req))
write("fuzz_http_head", "port80-redirect", stream(1, [], b"GET /x?y=1 HTTP/1.1\r\nHost: derp.example.com\r\n\r\n"))
write("fuzz_http_head", "derp-disabled", stream(2, [], go_fast))

# fuzz_ws: [flags][n][plan][stream]
masked = bytes([0x82, 0x83, 1, 2, 3, 4]) + bytes(b ^ m for b, m in zip(b"abc", [1, 2, 3]))
write("fuzz_ws", "ping-data-close", stream(0, [], bytes([0x89, 0x02]) + b"hi" + masked + bytes([0x88, 0x00])))
write("fuzz_ws", "chunked", stream(0, [1, 0, 3], masked + bytes([0x82, 0x7e, 0x01, 0x00]) + bytes(256)))
write("fuzz_ws", "long-len", stream(0, [], bytes([0x82, 0xff]) + struct.pack(">Q", 1 << 40) + bytes(4) + b"xyz"))
write("fuzz_ws", "bad-opcode", stream(0, [], masked + bytes([0x83, 0x00])))
write("fuzz_ws", "round-trip", stream(1, [2, 0], bytes([3, 1]) + b"abcdefghi" + bytes([50, 0]) + bytes(150)))

# fuzz_stun: [mode][addr: 16][port: 2][rest]
v6 = bytes.fromhex("20010db8000000000000000000000001")
write("fuzz_stun", "golden-v4", bytes([4]) + bytes([203, 0, 113, 5]) + bytes(12) + struct.pack(">H", 41641) + STUN_REQUEST)
write("fuzz_stun", "golden-v6", bytes([0]) + v6 + struct.pack(">H", 3478) + STUN_REQUEST)
write("fuzz_stun", "built", bytes([1 | 2]) + v6 + struct.pack(">H", 1) + bytes(range(12)) + struct.pack(">HB", 0x0006, 3) + b"abc")
write("fuzz_stun", "built-no-software", bytes([1]) + v6 + struct.pack(">H", 1) + bytes(range(12)) + struct.pack(">HB", 0x8022, 8) + b"tailnodf")

# fuzz_client_info: [mode][rest]
client_priv = bytes.fromhex("2022232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f40")
write("fuzz_client_info", "golden", bytes([0]) + CLIENT_INFO_FRAME[5:])
write("fuzz_client_info", "sealed", bytes([1]) + client_priv + bytes(range(24)) + b'{"version":2,"CanAckPings":true}')
write("fuzz_client_info", "sealed-mesh", bytes([1]) + client_priv + bytes(range(24))
      + b'{"meshKey":"' + b"ab" * 32 + b'","version":2,"CanAckPings":false,"IsProber":true}')
write("fuzz_client_info", "json-lenient", bytes([2]) + b'{"MeshKey":"ab","VERSION":2,"canackpings":true,"AppName":"x","x":[1,{"y":null}]}')
write("fuzz_client_info", "json-odd", bytes([2]) + b'{"meshKey":null,"version":4294967296,"IsProber":"yes"}')

# fuzz_tls_records: [mode][suite][rx seq: 8][tx seq: 8][rest]
seqs = struct.pack(">QQ", 0, 7)
write("fuzz_tls_records", "raw", bytes([0, 0]) + seqs + bytes([23, 3, 3, 0, 0x20]) + bytes(range(32)) + bytes([22, 3, 1, 0, 5]))
write("fuzz_tls_records", "rustls-aes", bytes([1, 0]) + seqs + bytes([2, 3, 0]) + struct.pack(">BH", 23, 5) + b"hello"
      + struct.pack(">BH", 21, 2) + b"\x01\x00" + struct.pack(">BH", 22, 5) + b"\x18\x00\x00\x01\x01")
write("fuzz_tls_records", "rustls-chacha-big", bytes([1, 1]) + seqs + bytes([1, 0xf0]) + struct.pack(">BH", 23, 16384) + b"x")
write("fuzz_tls_records", "padded", bytes([2, 0]) + seqs + struct.pack(">H", 300) + b"data\x17")
write("fuzz_tls_records", "padded-full", bytes([2, 1]) + seqs + struct.pack(">H", 16370) + b"data\x17")

# fuzz_pin_verifier: [mode][rest] (pool: 0 pinned leaf, 1 metacert, 2 CN-like attacker,
# 3 derpkey outside the CN, 4 derpkey.example.com leaf, 5 expired, 6 16-bit-serial metacert)
def chain(pin, ee, rest, flip=(0, 0), time=0, name=1):
    return bytes([1, pin, ee, len(rest)] + rest) + struct.pack(">HB", *flip) + bytes([time, name])
write("fuzz_pin_verifier", "honest", chain(0, 0, [1]))
write("fuzz_pin_verifier", "honest-ip", chain(0, 0, [], name=0))
write("fuzz_pin_verifier", "attacker-first", chain(0, 2, [0]))
write("fuzz_pin_verifier", "pinned-then-attacker", chain(0, 0, [3]))
write("fuzz_pin_verifier", "attacker-alone", chain(2, 2, []))
write("fuzz_pin_verifier", "derpkey-outside-cn", chain(3, 3, [1, 1]))
write("fuzz_pin_verifier", "derpkey-hostname", chain(4, 4, [1], name=2))
write("fuzz_pin_verifier", "expired", chain(5, 5, [], time=0))
write("fuzz_pin_verifier", "big-serial", chain(0, 0, [6]))
write("fuzz_pin_verifier", "flipped", chain(0, 0, [1], flip=(0x1040, 0x01)))
write("fuzz_pin_verifier", "boundary", chain(0, 0, [1], time=2))
write("fuzz_pin_verifier", "raw", bytes([0, 1, 0, 1, 2]) + struct.pack(">H", 6) + bytes([0x30, 0x04, 0x30, 0x02, 0x05, 0x00]) + struct.pack(">H", 2) + bytes([0x30, 0x00]))
write("fuzz_pin_verifier", "pin-string", bytes([2]) + b"sha256-raw:" + b"0123456789abcdef" * 4)
