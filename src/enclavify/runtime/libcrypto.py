"""AES-256-GCM and X25519 from the system's OpenSSL ``libcrypto`` through ``ctypes``.

This is the fallback behind :mod:`enclavify.crypto` for interpreters without pyca/cryptography,
which is the usual case for the interpreter carried into a confidential image. It needs
OpenSSL 1.1.1 or later, the first release with raw X25519 key import and export.

This module is carried into confidential images, so it uses only the standard library and
Python 3.8 syntax.
"""

from __future__ import annotations

import _thread
import ctypes
import itertools

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs about 2 ms at every container start
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
        # Each thread keeps its own cipher contexts, so ciphers need no lock (see AesGcm).
        # threading.local is this class; importing threading costs about 1 ms at every
        # container start.
        self.threads = _thread._local()
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
        # An instance attribute spares the per-call detour through __getattr__.
        setattr(self, name, function)

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
_load_lock = _thread.allocate_lock()


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


class _Context:
    """An ``EVP_CIPHER_CTX`` set up for AES-256-GCM in one direction, owned by one thread.

    ``owner`` is the token of the :class:`AesGcm` whose key the context holds, 0 for none.
    """

    def __init__(self, lib: Libcrypto, encrypt: bool) -> None:
        self.lib = lib
        self.owner = 0
        # Output length cell for update and final calls, reused by every call of this thread.
        self.length = ctypes.c_int(0)
        self.length_ref = ctypes.byref(self.length)
        self.handle = lib.EVP_CIPHER_CTX_new()
        if not self.handle:
            raise LibcryptoError(f"EVP_CIPHER_CTX_new failed in {lib.name}")
        self.init = lib.EVP_EncryptInit_ex if encrypt else lib.EVP_DecryptInit_ex
        lib.check(self.init(self.handle, lib.EVP_aes_256_gcm(), None, None, None),
                  "EVP cipher init")
        lib.check(
            lib.EVP_CIPHER_CTX_ctrl(self.handle, _EVP_CTRL_GCM_SET_IVLEN, NONCE_SIZE, None),
            "setting the GCM nonce length",
        )

    def __del__(self) -> None:
        # Freeing cleanses the key schedule. At interpreter exit the library may already be
        # unloaded, and then the OS frees it all.
        try:
            if self.handle:
                self.lib.EVP_CIPHER_CTX_free(self.handle)
                self.handle = None
        except Exception:  # noqa: S110 - nothing to report to at interpreter exit
            pass


# Tokens tell apart AesGcm objects for the contexts; unlike id() they are never reused.
_tokens = itertools.count(1)


class AesGcm:
    """AES-256-GCM with 12-byte nonces and 16-byte tags appended to the ciphertext.

    Every thread has one cipher context per direction, shared by all AesGcm objects. A call
    restarts it at the call's nonce and sets this object's key only when another object used
    the context last. So a run of calls under one key pays for the key schedule once, and a
    new key costs no context allocation. An object may be used from several threads.
    """

    def __init__(self, key: bytes, lib: Optional[Libcrypto] = None) -> None:
        if len(key) != 32:
            raise ValueError(f"AES-256-GCM needs a 32-byte key, got {len(key)} bytes")
        self._key = bytes(key)
        self._lib = lib if lib is not None else load()
        self._token = next(_tokens)

    def _context(self, encrypt: bool, nonce: bytes) -> _Context:
        """Return this thread's context for ``encrypt``, keyed for this object, at ``nonce``."""
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"AES-GCM nonce must be {NONCE_SIZE} bytes, got {len(nonce)} bytes")
        context = _thread_context(self._lib, encrypt)
        if context.owner == self._token:
            # A NULL cipher and key keep the key schedule and restart GCM at this nonce.
            result = context.init(context.handle, None, None, None, bytes(nonce))
        else:
            context.owner = 0
            result = context.init(context.handle, None, None, self._key, bytes(nonce))
        self._lib.check(result, "setting the key and nonce")
        context.owner = self._token
        return context

    def encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """Return ``ciphertext || tag``."""
        lib = self._lib
        plaintext = _as_bytes(plaintext)
        aad = _as_bytes(aad)
        size = len(plaintext)
        out = ctypes.create_string_buffer(size + TAG_SIZE)
        out_address = ctypes.addressof(out)
        context = self._context(True, nonce)
        ctx = context.handle
        encrypt = lib.EVP_EncryptUpdate
        _update(lib, encrypt, context, out=0, address=_address(aad), length=len(aad))
        written = _update(
            lib, encrypt, context, out=out_address, address=_address(plaintext), length=size
        )
        # GCM is a stream mode, so the final call outputs nothing.
        lib.check(
            lib.EVP_EncryptFinal_ex(ctx, out_address + written, context.length_ref), "GCM final"
        )
        if written + context.length.value != size:
            raise LibcryptoError(f"{lib.name} produced a ciphertext of unexpected length")
        lib.check(
            lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_GET_TAG, TAG_SIZE, out_address + size),
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
        data = _as_bytes(data)
        size = len(data) - TAG_SIZE
        out = ctypes.create_string_buffer(size or 1)
        self._decrypt(nonce, _address(data), size, _as_bytes(aad), ctypes.addressof(out))
        return out.raw[:size]

    def decrypt_into(self, nonce: bytes, data: Any, aad: bytes, out: Any) -> None:
        """Decrypt ``ciphertext || tag`` from the buffer ``data`` into the writable buffer ``out``.

        ``out`` must have exactly ``len(data) - 16`` bytes; nothing is allocated per call. On
        a tag mismatch ``out`` is zeroed, so no unverified plaintext stays in it.

        Raises:
            TagMismatchError: the tag does not match (wrong key, nonce, data or aad).
            ValueError: ``out`` has the wrong size or is not writable.
        """
        source = memoryview(data)
        target = memoryview(out)
        if source.nbytes < TAG_SIZE:
            raise TagMismatchError
        size = source.nbytes - TAG_SIZE
        if target.nbytes != size or target.readonly:
            raise ValueError(f"decrypt_into needs a writable buffer of {size} bytes")
        # Kept referenced until the call returns: they pin the buffers' memory.
        source_pin: Any = data if isinstance(data, bytes) else source
        if isinstance(source_pin, bytes) or source.readonly:
            source_pin = bytes(source_pin)
            source_address = _address(source_pin)
        else:
            source_pin = ctypes.c_char.from_buffer(source)
            source_address = ctypes.addressof(source_pin)
        # GCM writes nothing for an empty plaintext, but libcrypto still wants a pointer.
        target_pin: Any = ctypes.c_char.from_buffer(target) if size else ctypes.c_char()
        self.decrypt_at(nonce, source_address, size, _as_bytes(aad), ctypes.addressof(target_pin))
        del source_pin, target_pin

    def decrypt_at(self, nonce: bytes, source: int, size: int, aad: bytes, out: int) -> None:
        """Decrypt ``size`` bytes at address ``source``, followed by their tag, to ``out``.

        The caller keeps both memory areas alive and large enough (see :func:`pin`). On a tag
        mismatch the ``size`` bytes at ``out`` are zeroed, so no unverified plaintext stays.

        Raises:
            TagMismatchError: the tag does not match (wrong key, nonce, data or aad).
        """
        try:
            self._decrypt(nonce, source, size, aad, out)
        except TagMismatchError:
            ctypes.memset(out, 0, size)
            raise

    def _decrypt(self, nonce: bytes, source: int, size: int, aad: bytes, out: int) -> None:
        """Decrypt ``size`` bytes at ``source``, followed by their tag, into ``out``."""
        context = self._context(False, nonce)
        _decrypt_keyed(self._lib, context, aad, source=source, size=size, out=out)


def _thread_context(lib: Libcrypto, encrypt: bool) -> _Context:
    """Return this thread's cipher context for one direction, making it on first use."""
    name = "encrypt" if encrypt else "decrypt"
    context: Optional[_Context] = getattr(lib.threads, name, None)
    if context is None:
        context = _Context(lib, encrypt)
        setattr(lib.threads, name, context)
    return context


def decrypt_with_key(
    lib: Libcrypto, key: bytes, nonce: bytes, aad: bytes, *, source: int, size: int, out: int
) -> None:
    """Decrypt ``size`` bytes at address ``source``, followed by their tag, to ``out``.

    This is :meth:`AesGcm.decrypt_at` under ``key`` without an :class:`AesGcm`. The unsealer
    decrypts each file under a key of its own, mostly a single chunk, and making the object
    cost more than the libcrypto calls. ``key`` and ``nonce`` must have 32 and 12 bytes. On a
    tag mismatch the ``size`` bytes at ``out`` are zeroed.

    Raises:
        TagMismatchError: the tag does not match (wrong key, nonce, data or aad).
    """
    context = _thread_context(lib, False)
    context.owner = 0  # no AesGcm object has this key
    lib.check(context.init(context.handle, None, None, key, nonce), "setting the key and nonce")
    try:
        _decrypt_keyed(lib, context, aad, source=source, size=size, out=out)
    except TagMismatchError:
        ctypes.memset(out, 0, size)
        raise


def _decrypt_keyed(
    lib: Libcrypto, context: _Context, aad: bytes, *, source: int, size: int, out: int
) -> None:
    """Decrypt ``size`` bytes at ``source``, followed by their tag, with ``context`` as keyed.

    Raises:
        TagMismatchError: the tag does not match.
    """
    handle = context.handle
    length_ref = context.length_ref
    update = lib.EVP_DecryptUpdate
    if size <= _MAX_UPDATE and len(aad) <= _MAX_UPDATE:
        # The unsealer comes here for every chunk, so the common case makes its two update
        # calls directly, with the associated data passed as bytes instead of an address.
        if (
            update(handle, None, length_ref, aad, len(aad)) != 1
            or update(handle, out, length_ref, source, size) != 1
        ):
            lib.check(0, "GCM update")
        written = context.length.value
    else:
        _update(lib, update, context, out=0, address=_address(aad), length=len(aad))
        written = _update(lib, update, context, out=out, address=source, length=size)
    lib.check(
        lib.EVP_CIPHER_CTX_ctrl(handle, _EVP_CTRL_GCM_SET_TAG, TAG_SIZE, source + size),
        "setting the GCM tag",
    )
    if lib.EVP_DecryptFinal_ex(handle, out + written, length_ref) != 1:
        lib.ERR_clear_error()
        raise TagMismatchError
    if written + context.length.value != size:
        raise LibcryptoError(f"{lib.name} produced a plaintext of unexpected length")


def _update(
    lib: Libcrypto, update: Any, context: _Context, *, out: int, address: int, length: int
) -> int:
    """Feed ``length`` bytes at ``address`` through ``update`` into the memory at ``out``.

    ``out`` is 0 for associated data. Returns how many bytes were written to ``out``.
    EVP update calls take an int length, so longer inputs go through in pieces.
    """
    if length <= _MAX_UPDATE:
        lib.check(
            update(context.handle, out or None, context.length_ref, address, length),
            "GCM update",
        )
        return context.length.value
    written = 0
    for start in range(0, length, _MAX_UPDATE):
        piece = min(_MAX_UPDATE, length - start)
        target = (out + written) if out else None
        lib.check(
            update(context.handle, target, context.length_ref, address + start, piece),
            "GCM update",
        )
        written += context.length.value
    return written


def pin(buffer: Any) -> tuple[Any, int]:
    """Return an object that keeps the writable, non-empty ``buffer`` in place, and its address.

    The buffer cannot be resized while the returned object lives.
    """
    holder = ctypes.c_char.from_buffer(buffer)
    return holder, ctypes.addressof(holder)


def _address(data: bytes) -> int:
    """Return the address of the bytes object's contents (no copy; valid while it lives)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


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
