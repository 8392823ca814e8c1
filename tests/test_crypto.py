"""The crypto facade: known-answer vectors, and each backend checked against the other."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavify import crypto
from enclavify.runtime import libcrypto

BACKENDS = list(crypto.BACKENDS)
PAIRS = [(a, b) for a in BACKENDS for b in BACKENDS if a != b]


@pytest.fixture
def restore_backend() -> Iterator[None]:
    yield
    crypto.select_backend(None)


# AES-256-GCM test cases 13 and 14 of McGrew and Viega, "The Galois/Counter Mode of Operation".
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("plaintext", "expected"),
    [
        (b"", "530f8afbc74536b9a963b4f1c4cb738b"),
        (bytes(16), "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919"),
    ],
)
def test_aes_gcm_matches_published_vectors(backend: str, plaintext: bytes, expected: str) -> None:
    sealed = crypto.aes_gcm_encrypt(bytes(32), bytes(12), plaintext, b"", backend=backend)

    assert sealed.hex() == expected
    assert crypto.aes_gcm_decrypt(bytes(32), bytes(12), sealed, b"", backend=backend) == plaintext


@settings(max_examples=60, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32),
    nonce=st.binary(min_size=12, max_size=12),
    plaintext=st.one_of(st.binary(max_size=300), st.sampled_from([bytes(65536), b"x" * 70001])),
    aad=st.binary(max_size=80),
)
def test_aes_gcm_backends_agree_both_ways(
    key: bytes, nonce: bytes, plaintext: bytes, aad: bytes
) -> None:
    for sealer, opener in PAIRS:
        sealed = crypto.aes_gcm_encrypt(key, nonce, plaintext, aad, backend=sealer)
        assert len(sealed) == len(plaintext) + 16
        assert crypto.aes_gcm_decrypt(key, nonce, sealed, aad, backend=opener) == plaintext
    assert crypto.aes_gcm_encrypt(key, nonce, plaintext, aad, backend="libcrypto") == (
        crypto.aes_gcm_encrypt(key, nonce, plaintext, aad, backend="cryptography")
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", ["ciphertext", "tag", "aad", "nonce", "key", "truncated"])
def test_aes_gcm_altered_input_fails_authentication(backend: str, change: str) -> None:
    key, nonce, aad = os.urandom(32), os.urandom(12), b"header"
    sealed = bytearray(crypto.aes_gcm_encrypt(key, nonce, b"attack at dawn", aad, backend=backend))
    if change == "ciphertext":
        sealed[0] ^= 1
    elif change == "tag":
        sealed[-1] ^= 0x80
    elif change == "aad":
        aad = b"Header"
    elif change == "nonce":
        nonce = bytes(12)
    elif change == "key":
        key = os.urandom(32)
    else:
        sealed = sealed[:10]

    with pytest.raises(crypto.AuthenticationError) as excinfo:
        crypto.aes_gcm_decrypt(key, nonce, bytes(sealed), aad, backend=backend)
    assert str(excinfo.value) == "authentication failed"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [0, 1, 4096, 70000])
def test_decrypt_into_fills_buffer_slice(backend: str, size: int) -> None:
    cipher = crypto.AesGcm(os.urandom(32), backend=backend)
    plaintext = os.urandom(size)
    sealed = cipher.encrypt(bytes(12), plaintext, b"aad")
    source = bytearray(3) + bytearray(sealed)
    out = bytearray(size + 10)

    cipher.decrypt_into(bytes(12), memoryview(source)[3:], b"aad", memoryview(out)[5 : 5 + size])

    assert out == bytes(5) + plaintext + bytes(5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decrypt_into_zeroes_output_on_failure(backend: str) -> None:
    cipher = crypto.AesGcm(os.urandom(32), backend=backend)
    sealed = bytearray(cipher.encrypt(bytes(12), b"secret text" * 100, b""))
    sealed[-1] ^= 1
    out = bytearray(len(sealed) - 16)

    with pytest.raises(crypto.AuthenticationError):
        cipher.decrypt_into(bytes(12), sealed, b"", out)
    assert out == bytes(len(out))
    with pytest.raises(ValueError, match="must hold"):
        cipher.decrypt_into(bytes(12), sealed, b"", bytearray(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [0, 1, 4096, 70000])
def test_decrypt_between_fills_buffer_range(backend: str, size: int) -> None:
    cipher = crypto.AesGcm(os.urandom(32), backend=backend)
    plaintext = os.urandom(size)
    sealed = bytearray(3) + bytearray(cipher.encrypt(bytes(12), plaintext, b"aad")) + bytearray(2)
    buffers = crypto.Buffers(sealed, bytearray(size + 10), backend=backend)

    cipher.decrypt_between(
        bytes(12), b"aad", buffers, sealed_offset=3, size=size, plain_offset=5
    )

    assert bytes(buffers.plain) == bytes(5) + plaintext + bytes(5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decrypt_between_zeroes_output_on_failure(backend: str) -> None:
    cipher = crypto.AesGcm(os.urandom(32), backend=backend)
    sealed = bytearray(cipher.encrypt(bytes(12), b"secret text" * 100, b""))
    sealed[-1] ^= 1
    size = len(sealed) - 16
    buffers = crypto.Buffers(sealed, bytearray(size), backend=backend)

    with pytest.raises(crypto.AuthenticationError):
        cipher.decrypt_between(bytes(12), b"", buffers, sealed_offset=0, size=size, plain_offset=0)
    assert bytes(buffers.plain) == bytes(size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("sealed_offset", "size", "plain_offset"),
    [(1, 100, 0), (0, 101, 0), (0, 100, 1), (-1, 10, 0), (0, 10, -1), (0, -1, 0)],
)
def test_decrypt_between_rejects_ranges_outside_buffers(
    backend: str, sealed_offset: int, size: int, plain_offset: int
) -> None:
    # With libcrypto the ranges become raw addresses, so a range past a buffer's end must
    # never reach the library.
    cipher = crypto.AesGcm(os.urandom(32), backend=backend)
    buffers = crypto.Buffers(bytearray(116), bytearray(100), backend=backend)

    with pytest.raises(ValueError, match="do not fit the buffers"):
        cipher.decrypt_between(
            bytes(12), b"", buffers, sealed_offset=sealed_offset, size=size,
            plain_offset=plain_offset,
        )
    assert bytes(buffers.plain) == bytes(100)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [0, 1, 4096, 70000])
def test_buffers_decrypt_alternating_keys(backend: str, size: int) -> None:
    keys = [os.urandom(32), os.urandom(32)]
    texts = [os.urandom(size), os.urandom(size)]
    objects = [
        crypto.AesGcm(key, backend=backend).encrypt(bytes(12), text, b"aad")
        for key, text in zip(keys, texts, strict=True)
    ]
    sealed = bytearray(3) + bytearray(b"".join(objects))
    buffers = crypto.Buffers(sealed, bytearray(size + 10), backend=backend)

    # Keys alternate, as they do from file to file, and back to the first.
    for index in (0, 1, 0):
        buffers.decrypt(
            keys[index], bytes(12), b"aad", sealed_offset=3 + index * (size + 16), size=size,
            plain_offset=5,
        )
        assert bytes(buffers.plain) == bytes(5) + texts[index] + bytes(5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffers_decrypt_zeroes_output_on_failure(backend: str) -> None:
    key = os.urandom(32)
    sealed = bytearray(crypto.AesGcm(key, backend=backend).encrypt(bytes(12), b"x" * 100, b""))
    buffers = crypto.Buffers(sealed, bytearray(100), backend=backend)

    for wrong_key, aad in ((os.urandom(32), b""), (key, b"other")):
        with pytest.raises(crypto.AuthenticationError):
            buffers.decrypt(wrong_key, bytes(12), aad, sealed_offset=0, size=100, plain_offset=0)
        assert bytes(buffers.plain) == bytes(100)
    with pytest.raises(ValueError, match="do not fit the buffers"):
        buffers.decrypt(key, bytes(12), b"", sealed_offset=1, size=100, plain_offset=0)
    with pytest.raises(ValueError, match="32-byte key"):
        buffers.decrypt(key[:16], bytes(12), b"", sealed_offset=0, size=100, plain_offset=0)
    with pytest.raises(ValueError, match="nonce must be 12 bytes"):
        buffers.decrypt(key, bytes(8), b"", sealed_offset=0, size=100, plain_offset=0)


def test_libcrypto_feeds_long_inputs_in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    # EVP update calls take an int length; inputs longer than one call takes go in pieces.
    monkeypatch.setattr(libcrypto, "_MAX_UPDATE", 7)
    key = os.urandom(32)
    plaintext = os.urandom(50)
    aad = os.urandom(20)
    reference = crypto.AesGcm(key, backend="cryptography").encrypt(bytes(12), plaintext, aad)
    cipher = crypto.AesGcm(key, backend="libcrypto")

    assert cipher.encrypt(bytes(12), plaintext, aad) == reference
    assert cipher.decrypt(bytes(12), reference, aad) == plaintext
    buffers = crypto.Buffers(bytearray(reference), bytearray(50), backend="libcrypto")
    buffers.decrypt(key, bytes(12), aad, sealed_offset=0, size=50, plain_offset=0)
    assert bytes(buffers.plain) == plaintext


def test_empty_decryption_buffers_are_rejected() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        crypto.Buffers(bytearray(16), bytearray())


def test_libcrypto_ciphers_keep_own_keys() -> None:
    first = libcrypto.AesGcm(os.urandom(32))
    second = libcrypto.AesGcm(os.urandom(32))
    one = first.encrypt(bytes(12), b"one", b"")
    two = second.encrypt(bytes(12), b"two", b"")
    for _ in range(3):
        assert first.decrypt(bytes(12), one, b"") == b"one"
        assert second.decrypt(bytes(12), two, b"") == b"two"
        with pytest.raises(libcrypto.TagMismatchError):
            second.decrypt(bytes(12), one, b"")


def test_libcrypto_cipher_used_from_several_threads() -> None:
    cipher = libcrypto.AesGcm(os.urandom(32))
    messages = [os.urandom(5000) for _ in range(8)]
    sealed = [cipher.encrypt(i.to_bytes(12, "big"), m, b"") for i, m in enumerate(messages)]

    def check(index: int) -> bool:
        own = libcrypto.AesGcm(os.urandom(32))
        for _ in range(50):
            secret = own.encrypt(bytes(12), b"own", b"")
            if cipher.decrypt(index.to_bytes(12, "big"), sealed[index], b"") != messages[index]:
                return False
            if own.decrypt(bytes(12), secret, b"") != b"own":
                return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, range(len(messages))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_aes_gcm_cipher_is_reusable_after_failure(backend: str) -> None:
    key = os.urandom(32)
    cipher = crypto.AesGcm(key, backend=backend)
    good = cipher.encrypt(bytes(12), b"first", b"")
    bad = good[:-1] + bytes([good[-1] ^ 1])

    with pytest.raises(crypto.AuthenticationError):
        cipher.decrypt(bytes(12), bad, b"")
    assert cipher.decrypt(bytes(12), good, b"") == b"first"
    second = cipher.encrypt(bytes([1]) * 12, b"second", b"aad")
    assert cipher.decrypt(bytes([1]) * 12, second, b"aad") == b"second"
    assert second == crypto.aes_gcm_encrypt(key, bytes([1]) * 12, b"second", b"aad")


@pytest.mark.parametrize(("key_size", "nonce_size"), [(16, 12), (31, 12), (32, 8), (32, 16)])
def test_aes_gcm_rejects_wrong_key_or_nonce_size(key_size: int, nonce_size: int) -> None:
    with pytest.raises(ValueError, match="bytes"):
        crypto.aes_gcm_encrypt(bytes(key_size), bytes(nonce_size), b"", b"")


# RFC 7748, section 6.1.
ALICE_PRIVATE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
ALICE_PUBLIC = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
BOB_PRIVATE = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"
BOB_PUBLIC = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


@pytest.mark.parametrize("backend", BACKENDS)
def test_x25519_matches_rfc_7748(backend: str) -> None:
    alice = bytes.fromhex(ALICE_PRIVATE)
    bob = bytes.fromhex(BOB_PRIVATE)

    assert crypto.x25519_exchange(alice, bytes.fromhex(BOB_PUBLIC), backend=backend).hex() == SHARED
    assert crypto.x25519_exchange(bob, bytes.fromhex(ALICE_PUBLIC), backend=backend).hex() == SHARED


def test_libcrypto_derives_rfc_7748_public_key() -> None:
    assert libcrypto.x25519_public(bytes.fromhex(ALICE_PRIVATE)).hex() == ALICE_PUBLIC


@pytest.mark.parametrize(("generator", "peer"), PAIRS)
def test_x25519_keys_from_one_backend_work_in_the_other(generator: str, peer: str) -> None:
    own_private, own_public = crypto.x25519_generate(backend=generator)
    peer_private, peer_public = crypto.x25519_generate(backend=peer)

    assert len(own_private) == len(own_public) == 32
    assert libcrypto.x25519_public(own_private) == own_public
    assert crypto.x25519_exchange(own_private, peer_public, backend=peer) == (
        crypto.x25519_exchange(peer_private, own_public, backend=generator)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_x25519_generates_fresh_keys(backend: str) -> None:
    assert crypto.x25519_generate(backend=backend) != crypto.x25519_generate(backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("peer", [bytes(32), bytes([1]) + bytes(31)])
def test_x25519_small_order_peer_is_rejected(backend: str, peer: bytes) -> None:
    private, _ = crypto.x25519_generate(backend=backend)

    with pytest.raises(ValueError):
        crypto.x25519_exchange(private, peer, backend=backend)


def test_x25519_rejects_wrong_key_size() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.x25519_exchange(bytes(31), bytes(32))


def test_hkdf_matches_rfc_5869_case_1() -> None:
    okm = crypto.hkdf_sha256(
        bytes([0x0B]) * 22,
        salt=bytes(range(13)),
        info=bytes(range(0xF0, 0xFA)),
        length=42,
    )

    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


@given(
    secret=st.binary(min_size=1, max_size=64),
    salt=st.binary(max_size=64),
    info=st.binary(max_size=64),
    length=st.integers(min_value=1, max_value=255 * 32),
)
def test_hkdf_agrees_with_cryptography(
    secret: bytes, salt: bytes, info: bytes, length: int
) -> None:
    reference = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info)

    assert crypto.hkdf_sha256(secret, salt=salt, info=info, length=length) == (
        reference.derive(secret)
    )


@pytest.mark.parametrize("length", [0, 255 * 32 + 1])
def test_hkdf_rejects_length_out_of_range(length: int) -> None:
    with pytest.raises(ValueError, match="length"):
        crypto.hkdf_sha256(b"secret", salt=b"", info=b"", length=length)


def test_select_backend_forces_libcrypto(restore_backend: None) -> None:
    crypto.select_backend("libcrypto")

    assert crypto.backend_name() == "libcrypto"
    crypto.select_backend(None)
    assert crypto.backend_name() == "cryptography"


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown crypto backend 'openssl'"):
        crypto.select_backend("openssl")


def run_python(code: str, **environment: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


def test_environment_variable_forces_libcrypto() -> None:
    code = "from enclavify import crypto; print(crypto.backend_name())"

    assert run_python(code, ENCLAVIFY_CRYPTO_BACKEND="libcrypto") == "libcrypto"


def test_falls_back_to_libcrypto_without_cryptography() -> None:
    code = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from enclavify import crypto\n"
        "private, public = crypto.x25519_generate()\n"
        "print(crypto.backend_name(), len(public))"
    )

    assert run_python(code) == "libcrypto 32"


def test_missing_cryptography_is_looked_for_once() -> None:
    # Python does not cache a failed import. Looking for the package again for every cipher
    # cost about 30 µs a file when unsealing in a runtime without it.
    code = (
        "import sys; sys.modules['cryptography'] = None\n"
        "import builtins\n"
        "from enclavify import crypto\n"
        "attempts = []\n"
        "real_import = builtins.__import__\n"
        "def counting(name, *args, **kwargs):\n"
        "    if name.startswith('cryptography'):\n"
        "        attempts.append(name)\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = counting\n"
        "for _ in range(50):\n"
        "    crypto.AesGcm(bytes(32)).encrypt(bytes(12), b'data', b'')\n"
        "print(crypto.backend_name(), len(attempts))"
    )

    assert run_python(code) == "libcrypto 1"


def test_missing_libcrypto_is_a_clear_error() -> None:
    code = (
        "from enclavify.runtime import libcrypto\n"
        "try:\n"
        "    libcrypto.load(['libcrypto-that-does-not-exist.so'])\n"
        "except libcrypto.LibcryptoUnavailableError as exc:\n"
        "    print(exc)\n"
    )

    assert run_python(code).startswith("no libcrypto found (libcrypto-that-does-not-exist.so:")
