"""``remote``: the tier of ``remote_url``, its store chosen by the URL's scheme.

* A scheme claimed by a storage backend in the ``lmcache.url_schemes`` entry-point group
  (``lm://`` by the ``lm`` tier, lmcache's cache server; ``redis://``, ``rediss://``,
  ``redis+cluster://`` and ``unix://`` by the ``redis`` tier of ``lmcache-redis``; any
  scheme by a third party's) builds that backend with the same options.
* Anything else is an fsspec URL (``s3://bucket/prefix``, ``gs://``, ``file:///shared``,
  ``memory://x``) served by `FsspecTransport`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from lmcache.abc.remote_transport import RemoteTransport
from lmcache.abc.storage_backend import StorageBackendInterface, TierContext
from lmcache.kits.fsspec_objects import OBJECT_SUFFIX, FsspecObjects, url_syntax_problem
from lmcache.kits.remote import RemoteBackend, RemoteOptions, redact_url
from lmcache.plugin.registry import registry
from lmcache.utils import Buffer

__all__ = ["INSTALL_HINTS", "FsspecTransport", "RemoteStorageBackend"]

_REDIS_HINT = ("the redis tier: pip install -e plugins/lmcache-redis, in the lmcache "
               "checkout (the package index has no lmcache-redis)")
#: Schemes served by distributions that may not be installed: scheme → what to install.
#: Only for the error message; which backend serves a scheme is the registry's
#: ``url_scheme`` table.
INSTALL_HINTS = {scheme: _REDIS_HINT for scheme in
                 ("redis", "rediss", "redis+cluster", "rediss+cluster", "unix")}


class FsspecTransport(RemoteTransport):
    """Values as objects under an fsspec URL: ``s3://bucket/prefix`` (s3fs), ``gs://``,
    ``file:///shared/dir``, ``memory://x`` ...

    Each value is one object ``<url>/<namespace>/<key>.kvobj``. On object stores a put is
    one atomic object upload; on file systems it is written under a temporary name and
    renamed into place.

    Every call to an asynchronous file system (s3fs, gcsfs, ...) is cancelled after
    ``timeout_s``. For ``s3://`` each call is also one attempt (botocore's
    ``retries={"total_max_attempts": 1}`` and s3fs's own retry loop set to one), with
    connect and read timeouts of ``timeout_s``, unless ``storage_options`` say otherwise
    (``config_kwargs``; ``retries`` for s3fs's loop); and uploads are sent without
    ``Expect: 100-continue`` (a frozen server would otherwise hold a put forever, waiting
    for the "continue"): a handler on the botocore session drops the header.

    A URL that fsspec or the store would read as syntax is refused (`ValueError`): ``::``
    (fsspec URL chaining) anywhere, ``?`` or ``#`` in an object store's path (s3fs reads
    ``?versionId=`` as an object version).
    """

    def __init__(self, url: str, namespace: str = "lmcache", timeout_s: float = 10.0,
                 storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        problem = url_syntax_problem(url)
        if problem is not None:
            raise ValueError(f"remote URL {redact_url(url)!r}: {problem}; expected "
                             "scheme://bucket/prefix with a prefix of plain path segments "
                             "(for example s3://bucket/kv/cache)")
        options = dict(storage_options or {})
        protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
        s3 = protocol in ("s3", "s3a")
        retries = options.pop("retries", 1) if s3 else None
        if s3:
            config_kwargs = dict(options.get("config_kwargs") or {})
            config_kwargs.setdefault("connect_timeout", timeout_s)
            config_kwargs.setdefault("read_timeout", timeout_s)
            # one attempt per call: a retry would be a second timeout within one call
            config_kwargs.setdefault("retries", {"total_max_attempts": 1})
            options["config_kwargs"] = config_kwargs
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except ImportError as exc:
            extra = " (pip install -e '.[s3]' in the lmcache checkout)" if s3 else ""
            raise ImportError(f"the remote tier {redact_url(url)} needs an fsspec "
                              f"implementation of {protocol!r}: {exc}{extra}") from exc
        if retries is not None and hasattr(self.fs, "retries"):
            self.fs.retries = int(retries)  # s3fs's own retry loop (5 attempts by default)
        if s3:
            _no_expect_continue(self.fs)
        self.root = root.rstrip("/")
        self.prefix = f"{self.root}/{namespace}" if namespace else self.root
        self.objects = FsspecObjects(self.fs, self.prefix, timeout_s)
        self.atomic_put = self.objects.atomic_put
        self.description = redact_url(url)

    def object_name(self, key_string: str) -> str:
        return self.objects.path(f"{key_string}{OBJECT_SUFFIX}")

    def put(self, name: str, parts: Sequence[Buffer]) -> None:
        self.objects.put(name, parts)

    def get(self, name: str, max_bytes: int | None = None) -> Buffer | None:
        return self.objects.get(name, max_bytes)

    def exists(self, name: str) -> bool:
        return self.objects.exists(name)

    def delete(self, name: str) -> bool:
        return self.objects.delete(name)


def _drop_expect_header(request: Any, **kwargs: Any) -> None:
    # botocore's ``before-send`` event: the request is signed ("Expect" is never a signed
    # header) and about to go out. Returns None: the request is sent.
    if "Expect" in request.headers:
        del request.headers["Expect"]


def _no_expect_continue(fs: Any) -> None:
    """Make the s3fs file system ``fs`` send uploads without ``Expect: 100-continue``.

    botocore adds the header to every PutObject and UploadPart; aiohttp then holds the
    body until the server says "continue", and nothing bounds that wait: a put to a
    frozen server hung until the server was resumed. The handler goes on the
    aiobotocore session, whose clients copy its handlers when they are made (s3fs makes
    its client on first use; a session given in ``storage_options`` gets the handler
    too), and on a client made already.
    """
    session = getattr(fs, "session", None)
    if session is None:
        try:
            from aiobotocore.session import AioSession
        except ImportError:
            return
        session = AioSession(**getattr(fs, "kwargs", {}))
        fs.session = session
        # s3fs would make a new session (without the handler) on a refresh otherwise
        if hasattr(fs, "_session_is_owned"):
            fs._session_is_owned = False
    if hasattr(session, "register"):
        session.register("before-send.s3", _drop_expect_header,
                         unique_id="lmcache-no-expect-continue")
    client = getattr(fs, "_s3", None)
    events = getattr(getattr(client, "meta", None), "events", None)
    if events is not None:
        events.register("before-send.s3", _drop_expect_header,
                        unique_id="lmcache-no-expect-continue")


class RemoteStorageBackend(RemoteBackend):
    """The ``remote`` tier (``remote_url``): the store is chosen by the URL's scheme.

    A scheme that a storage backend claims (``lmcache.url_schemes``) builds that backend
    with the options given here (``lm://`` the ``lm`` tier, the cache server;
    ``redis://``, ``rediss://``, ``redis+cluster://`` and ``unix://`` the ``redis`` tier
    of ``lmcache-redis``); anything else is an fsspec URL served by `FsspecTransport`
    (``s3://`` needs s3fs: ``pip install -e '.[s3]'`` in the lmcache checkout).
    """

    class Options(RemoteOptions):
        storage_options: dict[str, Any] = Field(
            default_factory=dict, description="fsspec URLs only: keyword arguments of the "
            "file system (`endpoint_url`, `key`, `secret`, `client_kwargs`, ...).")

    @classmethod
    def from_options(cls, options: RemoteStorageBackend.Options, config: Any, metadata: Any,
                     context: TierContext) -> StorageBackendInterface:
        url = options.url
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        claimant = registry.backend_for_scheme(scheme) if scheme else None
        if claimant is not None and registry.load("storage_backend", claimant) is not cls:
            if options.storage_options:
                raise ValueError(f"storage_options apply to fsspec URLs only, not to "
                                 f"{redact_url(url)} (served by the {claimant!r} tier)")
            given = options.model_dump(exclude_unset=True, exclude={"storage_options"})
            return registry.create("storage_backend", claimant, given, config, metadata,
                                   context)
        if scheme in INSTALL_HINTS:
            raise ImportError(f"remote_url {redact_url(url)} needs {INSTALL_HINTS[scheme]}, "
                              "which is not installed")
        transport: RemoteTransport = FsspecTransport(url, options.namespace, options.timeout_s,
                                                     options.storage_options)
        return cls.from_transport(transport, options, config, metadata, context)
