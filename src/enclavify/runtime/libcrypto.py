"""AES-256-GCM and X25519 from the system's OpenSSL ``libcrypto`` through ``ctypes``.

This is the fallback behind :mod:`enclavify.crypto` for interpreters without pyca/cryptography,
which is the usual case for the interpreter carried into a confidential image. It needs
OpenSSL 1.1.1 or later, the first release with raw X25519 key import and export.

This module is carried into confidential images, so it uses only the standard library and
Python 3.8 syntax.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import Any, Optional, Sequence

# Tried in order. In a confidential image the carried loader's --library-path makes the copy
# under /opt/enclavify/lib the one dlopen finds.
LIBRARY_NAMES = ("libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so")

# Constants from openssl/evp.h and openssl/obj_mac.h; they are the same in 1.1.1 and 3.x.
_EVP_CTRL_GCM_SET_IVLEN = 0x9
_EVP_CTRL_GCM_GET_TAG = 0x10
_EVP_CTRL_GCM_SET_TAG = 0x11
_EVP_PKEY_X25519 = 1034

TAG_SIZE = 16
NONCE_SIZE = 12
# EVP_EncryptUpdate takes an int length, so longer inputs go through in pieces.
_MAX_UPDATE = 1 << 30


class LibcryptoUnavailableError(RuntimeError):
    """No usable libcrypto could be loaded."""


class LibcryptoError(RuntimeError):
    """A libcrypto call failed for a reason other than a failed authentication check."""


class TagMismatchError(Exception):
    """AES-GCM decryption found a tag that does not match."""


_CONST_SIZE_T_P = ctypes.POINTER(ctypes.c_size_t)
_INT_P = ctypes.POINTER(ctypes.c_int)


class Libcrypto:
    """The subset of libcrypto enclavify uses, bound with argument and return types."""

    def __init__(self, library: ctypes.CDLL, name: str) -> None:
        self.name = name
        self._lib = library
        try:
            self._bind()
        except AttributeError as exc:
            raise LibcryptoUnavailableError(
                f"{name} lacks {exc}; OpenSSL 1.1.1 or later is needed"
            ) from exc

    def _fn(self, name: str, restype: object, *argtypes: object) -> None:
        function = getattr(self._lib, name)
        function.restype = restype
        function.argtypes = list(argtypes)

    def _bind(self) -> None:
        vp = ctypes.c_void_p
        cp = ctypes.c_char_p
        i = ctypes.c_int
        self._fn("EVP_aes_256_gcm", vp)
        self._fn("EVP_CIPHER_CTX_new", vp)
        self._fn("EVP_CIPHER_CTX_free", None, vp)
        self._fn("EVP_CIPHER_CTX_ctrl", i, vp, i, i, vp)
        self._fn("EVP_EncryptInit_ex", i, vp, vp, vp, cp, cp)
        self._fn("EVP_EncryptUpdate", i, vp, vp, _INT_P, vp, i)
        self._fn("EVP_EncryptFinal_ex", i, vp, vp, _INT_P)
        self._fn("EVP_DecryptInit_ex", i, vp, vp, vp, cp, cp)
        self._fn("EVP_DecryptUpdate", i, vp, vp, _INT_P, vp, i)
        self._fn("EVP_DecryptFinal_ex", i, vp, vp, _INT_P)
        self._fn("EVP_PKEY_CTX_new_id", vp, i, vp)
        self._fn("EVP_PKEY_CTX_new", vp, vp, vp)
        self._fn("EVP_PKEY_CTX_free", None, vp)
        self._fn("EVP_PKEY_keygen_init", i, vp)
        self._fn("EVP_PKEY_keygen", i, vp, ctypes.POINTER(vp))
        self._fn("EVP_PKEY_free", None, vp)
        self._fn("EVP_PKEY_new_raw_private_key", vp, i, vp, cp, ctypes.c_size_t)
        self._fn("EVP_PKEY_new_raw_public_key", vp, i, vp, cp, ctypes.c_size_t)
        self._fn("EVP_PKEY_get_raw_private_key", i, vp, cp, _CONST_SIZE_T_P)
        self._fn("EVP_PKEY_get_raw_public_key", i, vp, cp, _CONST_SIZE_T_P)
        self._fn("EVP_PKEY_derive_init", i, vp)
        self._fn("EVP_PKEY_derive_set_peer", i, vp, vp)
        self._fn("EVP_PKEY_derive", i, vp, cp, _CONST_SIZE_T_P)
        self._fn("ERR_clear_error", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def check(self, result: int, operation: str) -> None:
        """Raise :class:`LibcryptoError` unless ``result`` is OpenSSL's success value 1."""
        if result != 1:
            self._lib.ERR_clear_error()
            raise LibcryptoError(f"{operation} failed in {self.name}")


_loaded: dict[str, Libcrypto] = {}
_load_lock = threading.Lock()


def load(names: Sequence[str] = LIBRARY_NAMES) -> Libcrypto:
    """Load and bind the first libcrypto of ``names`` that dlopen finds; cached after success.

    Raises:
        LibcryptoUnavailableError: none of them loads, or the one found is too old.
    """
    with _load_lock:
        if "lib" in _loaded:
            return _loaded["lib"]
        failures = []
        for name in names:
            try:
                library = ctypes.CDLL(name)
            except OSError as exc:
                failures.append(f"{name}: {exc}")
                continue
            _loaded["lib"] = Libcrypto(library, name)
            return _loaded["lib"]
        raise LibcryptoUnavailableError("no libcrypto found (" + "; ".join(failures) + ")")


class AesGcm:
    """AES-256-GCM with 12-byte nonces and 16-byte tags appended to the ciphertext.

    One cipher context per direction is set up with the key once and reused for every call
    with a new nonce, which keeps the per-chunk cost low. A lock serializes calls.
    """

    def __init__(self, key: bytes, lib: Optional[Libcrypto] = None) -> None:
        if len(key) != 32:
            raise ValueError(f"AES-256-GCM needs a 32-byte key, got {len(key)} bytes")
        self._key = bytes(key)
        self._lib = lib if lib is not None else load()
        self._contexts: dict[bool, int] = {}
        self._lock = threading.Lock()

    def __del__(self) -> None:
        # At interpreter exit the library may already be unloaded, and then the OS frees it all.
        with contextlib.suppress(Exception):
            for ctx in self._contexts.values():
                self._lib.EVP_CIPHER_CTX_free(ctx)
            self._contexts.clear()

    def _context(self, encrypt: bool, nonce: bytes) -> int:
        """Return the context for ``encrypt``, set to ``nonce``; the caller holds the lock."""
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"AES-GCM nonce must be {NONCE_SIZE} bytes, got {len(nonce)} bytes")
        lib = self._lib
        init = lib.EVP_EncryptInit_ex if encrypt else lib.EVP_DecryptInit_ex
        ctx = self._contexts.get(encrypt)
        if ctx is None:
            ctx = lib.EVP_CIPHER_CTX_new()
            if not ctx:
                raise LibcryptoError(f"EVP_CIPHER_CTX_new failed in {lib.name}")
            try:
                lib.check(init(ctx, lib.EVP_aes_256_gcm(), None, None, None), "EVP cipher init")
                lib.check(
                    lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_SET_IVLEN, NONCE_SIZE, None),
                    "setting the GCM nonce length",
                )
                lib.check(init(ctx, None, None, self._key, None), "setting the key")
            except BaseException:
                lib.EVP_CIPHER_CTX_free(ctx)
                raise
            self._contexts[encrypt] = ctx
        # A NULL cipher and key keep the context's key schedule and restart GCM at this nonce.
        lib.check(init(ctx, None, None, None, bytes(nonce)), "setting the nonce")
        return ctx

    def _update(self, update: Any, ctx: int, out: Any, data: bytes, length: int) -> int:
        """Feed ``data[:length]`` through ``update``; return how many bytes went to ``out``.

        ``out`` is None for associated data. The input is passed by address, without copies.
        """
        address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
        out_len = ctypes.c_int(0)
        written = 0
        for start in range(0, length, _MAX_UPDATE):
            piece = min(_MAX_UPDATE, length - start)
            target = None if out is None else ctypes.byref(out, written)
            self._lib.check(
                update(ctx, target, ctypes.byref(out_len), address + start, piece), "GCM update"
            )
            written += out_len.value
        return written

    def encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """Return ``ciphertext || tag``."""
        lib = self._lib
        plaintext = _as_bytes(plaintext)
        out = ctypes.create_string_buffer(len(plaintext) + TAG_SIZE)
        with self._lock:
            ctx = self._context(True, nonce)
            self._update(lib.EVP_EncryptUpdate, ctx, None, _as_bytes(aad), len(aad))
            written = self._update(lib.EVP_EncryptUpdate, ctx, out, plaintext, len(plaintext))
            tail = ctypes.c_int(0)
            # GCM is a stream mode, so the final call outputs nothing.
            lib.check(
                lib.EVP_EncryptFinal_ex(ctx, ctypes.byref(out, written), ctypes.byref(tail)),
                "GCM final",
            )
            if written + tail.value != len(plaintext):
                raise LibcryptoError(f"{lib.name} produced a ciphertext of unexpected length")
            lib.check(
                lib.EVP_CIPHER_CTX_ctrl(
                    ctx, _EVP_CTRL_GCM_GET_TAG, TAG_SIZE, ctypes.byref(out, len(plaintext))
                ),
                "reading the GCM tag",
            )
        return out.raw

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        """Return the plaintext of ``ciphertext || tag``.

        Raises:
            TagMismatchError: the tag does not match (wrong key, nonce, data or aad).
        """
        if len(data) < TAG_SIZE:
            raise TagMismatchError
        lib = self._lib
        data = _as_bytes(data)
        size = len(data) - TAG_SIZE
        out = ctypes.create_string_buffer(size or 1)
        tag = ctypes.create_string_buffer(data[size:], TAG_SIZE)
        with self._lock:
            ctx = self._context(False, nonce)
            self._update(lib.EVP_DecryptUpdate, ctx, None, _as_bytes(aad), len(aad))
            written = self._update(lib.EVP_DecryptUpdate, ctx, out, data, size)
            lib.check(
                lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_SET_TAG, TAG_SIZE, tag),
                "setting the GCM tag",
            )
            tail = ctypes.c_int(0)
            if lib.EVP_DecryptFinal_ex(ctx, ctypes.byref(out, written), ctypes.byref(tail)) != 1:
                lib.ERR_clear_error()
                raise TagMismatchError
            if written + tail.value != size:
                raise LibcryptoError(f"{lib.name} produced a plaintext of unexpected length")
        return out.raw if size else b""


def _as_bytes(data: Any) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)


def _raw_key(lib: Libcrypto, pkey: int, private: bool) -> bytes:
    getter = lib.EVP_PKEY_get_raw_private_key if private else lib.EVP_PKEY_get_raw_public_key
    buf = ctypes.create_string_buffer(32)
    size = ctypes.c_size_t(32)
    lib.check(getter(pkey, buf, ctypes.byref(size)), "reading a raw X25519 key")
    if size.value != 32:
        raise LibcryptoError(f"{lib.name} returned a {size.value}-byte X25519 key")
    return buf.raw


def x25519_generate(lib: Optional[Libcrypto] = None) -> tuple[bytes, bytes]:
    """Generate an X25519 key pair with ``EVP_PKEY_keygen``; return (private, public) raw keys."""
    lib = lib if lib is not None else load()
    ctx = lib.EVP_PKEY_CTX_new_id(_EVP_PKEY_X25519, None)
    if not ctx:
        raise LibcryptoError(f"EVP_PKEY_CTX_new_id(X25519) failed in {lib.name}")
    pkey = ctypes.c_void_p(None)
    try:
        lib.check(lib.EVP_PKEY_keygen_init(ctx), "X25519 keygen init")
        lib.check(lib.EVP_PKEY_keygen(ctx, ctypes.byref(pkey)), "X25519 keygen")
        return _raw_key(lib, pkey.value, True), _raw_key(lib, pkey.value, False)  # type: ignore[arg-type]
    finally:
        if pkey.value:
            lib.EVP_PKEY_free(pkey)
        lib.EVP_PKEY_CTX_free(ctx)


def x25519_public(private: bytes, lib: Optional[Libcrypto] = None) -> bytes:
    """Return the raw public key of a raw X25519 private key."""
    lib = lib if lib is not None else load()
    pkey = lib.EVP_PKEY_new_raw_private_key(_EVP_PKEY_X25519, None, bytes(private), 32)
    if not pkey:
        lib.ERR_clear_error()
        raise ValueError("invalid X25519 private key")
    try:
        return _raw_key(lib, pkey, False)
    finally:
        lib.EVP_PKEY_free(pkey)


def x25519_exchange(private: bytes, peer_public: bytes, lib: Optional[Libcrypto] = None) -> bytes:
    """Return the X25519 shared secret of ``private`` and ``peer_public`` (both raw, 32 bytes).

    Raises:
        ValueError: a key is malformed or the peer key is of small order (all-zero secret).
    """
    lib = lib if lib is not None else load()
    if len(private) != 32 or len(peer_public) != 32:
        raise ValueError("X25519 keys are 32 bytes")
    own = lib.EVP_PKEY_new_raw_private_key(_EVP_PKEY_X25519, None, bytes(private), 32)
    peer = lib.EVP_PKEY_new_raw_public_key(_EVP_PKEY_X25519, None, bytes(peer_public), 32)
    ctx = lib.EVP_PKEY_CTX_new(own, None) if own else None
    try:
        if not own or not peer or not ctx:
            lib.ERR_clear_error()
            raise ValueError("invalid X25519 key")
        lib.check(lib.EVP_PKEY_derive_init(ctx), "X25519 derive init")
        lib.check(lib.EVP_PKEY_derive_set_peer(ctx, peer), "X25519 derive set peer")
        secret = ctypes.create_string_buffer(32)
        size = ctypes.c_size_t(32)
        if lib.EVP_PKEY_derive(ctx, secret, ctypes.byref(size)) != 1:
            # OpenSSL refuses to derive an all-zero secret from a small-order peer key.
            lib.ERR_clear_error()
            raise ValueError("X25519 exchange failed: peer key of small order")
        result = secret.raw[: size.value]
    finally:
        if ctx:
            lib.EVP_PKEY_CTX_free(ctx)
        if peer:
            lib.EVP_PKEY_free(peer)
        if own:
            lib.EVP_PKEY_free(own)
    if result == bytes(32):
        raise ValueError("X25519 exchange failed: peer key of small order")
    return result
