"""Exception classes for eplb::error: one per kind of failure, found by its errc name."""


class Error(RuntimeError):
    """Every error eplb raises; ``code`` is the C++ errc name (``invalid_argument``, ``timeout``...)."""

    code = "internal"


class InvalidArgument(Error, ValueError):
    """An argument, map or config value is out of its domain (the message names it)."""


class Timeout(Error, TimeoutError):
    """A wait ran past its deadline (the message names what was waited for)."""


class PeerFailure(Error):
    """A peer died, went silent or reported an error (the message names the rank)."""


class BackendUnavailable(Error):
    """A backend was not built or cannot run on this machine."""


_BY_CODE = {
    "invalid_argument": InvalidArgument,
    "invalid_map": InvalidArgument,
    "invalid_config": InvalidArgument,
    "invalid_json": InvalidArgument,
    "timeout": Timeout,
    "peer_failure": PeerFailure,
    "backend_unavailable": BackendUnavailable,
}


def error_class(code):
    return _BY_CODE.get(code, Error)
