"""What kind of tensor a caller passed, and how to hand results back in the same kind."""

import numbers


def is_torch(x):
    """True for a torch.Tensor, without importing torch when the caller never did."""
    cls = type(x)
    return cls.__module__.startswith("torch") and hasattr(x, "__dlpack__")


def like(result, template):
    """numpy array `result` as `template`'s kind: a torch tensor (sharing memory) for torch inputs."""
    if is_torch(template):
        import torch

        return torch.from_numpy(result)
    return result


def device_of(device):
    """("cpu", 0) or ("cuda", ordinal) from a string, an int, a torch.device or None."""
    if device is None:
        return "cpu", 0
    if isinstance(device, numbers.Integral):
        return "cuda", int(device)
    kind = getattr(device, "type", None)
    if kind is not None:  # torch.device
        index = device.index
        if kind == "cuda" and index is None:
            import torch

            index = torch.cuda.current_device()
        return kind, index or 0
    text = str(device)
    if text == "cpu":
        return "cpu", 0
    if text == "cuda":
        import torch

        return "cuda", torch.cuda.current_device()
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise ValueError(f'device: "{text}" is not "cpu", "cuda", "cuda:N", an int or a torch.device')


def stream_handle(stream):
    """A raw cudaStream_t (int) from a torch stream, an int, or None (0: no stream)."""
    if stream is None:
        return 0
    if isinstance(stream, numbers.Integral):
        return int(stream)
    handle = getattr(stream, "cuda_stream", None)
    if handle is None:
        raise ValueError(f"stream: expected a torch.cuda.Stream, a raw handle (int) or None, got {type(stream).__name__}")
    return int(handle)


def from_dlpack_capsule(capsule, kind):
    """A tensor of `kind` ("torch" or "numpy") over the memory a DLPack capsule exports."""
    if kind == "torch":
        import torch.utils.dlpack

        return torch.utils.dlpack.from_dlpack(capsule)
    import numpy as np

    class _Exporter:  # numpy takes producers, not capsules
        def __dlpack__(self, stream=None):
            return capsule

        def __dlpack_device__(self):
            return (1, 0)

    return np.from_dlpack(_Exporter())
