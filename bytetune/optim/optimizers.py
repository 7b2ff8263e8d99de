"""Block-wise 8-bit optimizers: Adam8bit, AdamW8bit, SGD8bit (momentum) and Lion8bit.

States are stored per parameter as uint8 codes (one per element, flat) into the dynamic maps of
``bytetune.kernels.quant_maps`` plus one float32 absmax per block of ``block_size`` elements;
first moments use the signed map, Adam's second moment the unsigned one. The update itself is the
fused kernel of ``bytetune.kernels.optim_update`` (Triton on CUDA, the PyTorch reference on CPU),
called once per param group and step count with all of the group's 8-bit params (one kernel
launch on the GPU), and once with all of its 32-bit ones.

32-bit states (plain fp32 tensors, same update math) are used for a parameter when any holds:
- the optimizer or its param group has ``optim_bits=32``
  (e.g. ``Adam8bit([{"params": head, "optim_bits": 32}, {"params": rest}])``);
- the parameter has fewer than ``min_8bit_size`` elements (default 4096: biases, norms);
- ``optimizer.keep_32bit(param)`` was called before the parameter's first step;
- the parameter was marked with :func:`mark_32bit_state` (``StableEmbedding`` does this).

Non-finite gradients: an element whose gradient is inf or nan has its states reset to 0 and its
parameter left unchanged for that step, so it never corrupts the quantized states of its block.

State dict: plain tensors and ints (``torch.load(weights_only=True)`` works); ``load_state_dict``
restores states bit for bit (torch's default would cast float32 states to a bf16 param's dtype)
and rejects states whose shape or dtype do not fit the parameter.

Sharded parameters (FSDP2's DTensors, sharded on dim 0 over a 1-D mesh): each rank keeps the
states of its local shard only, quantized block-wise over that shard. ``state_dict`` returns those
states as DTensors over the parameter's mesh (codes and 32-bit states shaped and placed like the
parameter; each rank's absmax as one row of a [ranks, blocks] tensor, padded to the longest
shard), so ``torch.distributed.checkpoint`` writes every rank's part; ``load_state_dict`` takes
them back into the same sharding. The block layout depends on the shard boundaries: resume with
the same number of ranks. Give ``torch.distributed.checkpoint`` the state keyed by strings
(parameter names): under the integer keys of ``state_dict()`` it loads the tensors but leaves
each state's step count as the template had it. :meth:`init_states` builds that template.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from bytetune.kernels.blockwise import DEFAULT_BLOCK_SIZE, check_block_size, n_blocks
from bytetune.kernels.optim_update import (
    N_STATES,
    CodeBook,
    QuantizedStates,
    UpdateKind,
    UpdateScalars,
    optimizer_update_8bit,
    optimizer_update_32bit,
)
from bytetune.kernels.quant_maps import dynamic_map

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor, Shard
else:  # a torch build without distributed support has no sharded parameters
    DTensor = Shard = None

_OPTIM_BITS_ATTR = "_bytetune_optim_bits"
_SUPPORTED_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _is_sharded(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, or the tensor itself."""
    return tensor.to_local() if _is_sharded(tensor) else tensor


def mark_32bit_state(param: torch.Tensor) -> torch.Tensor:
    """Mark ``param`` so every bytetune optimizer keeps its states in fp32; returns ``param``."""
    setattr(param, _OPTIM_BITS_ATTR, 32)
    return param


class _BlockwiseOptimizer(torch.optim.Optimizer):
    """Shared machinery: state layout, the 8/32-bit choice, checks, step loop and state dicts."""

    KIND: UpdateKind

    def __init__(self, params, defaults: dict[str, Any], optim_bits: int, min_8bit_size: int, block_size: int):
        if defaults["lr"] < 0.0:
            raise ValueError(f"lr must be >= 0, got {defaults['lr']}")
        if defaults.get("weight_decay", 0.0) < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {defaults['weight_decay']}")
        if min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size}")
        defaults.update(optim_bits=optim_bits, min_8bit_size=min_8bit_size, block_size=block_size)
        self._keep_32bit_ids: set[int] = set()
        self._books: dict[tuple[torch.device, bool], CodeBook] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        bits = param_group.get("optim_bits", self.defaults["optim_bits"])
        if bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {bits}")
        check_block_size(param_group.get("block_size", self.defaults["block_size"]))
        super().add_param_group(param_group)

    def keep_32bit(self, param: torch.Tensor) -> None:
        """Keep this parameter's states in fp32 (call before its first step)."""
        if self.state.get(param):
            raise RuntimeError("keep_32bit must be called before the parameter's first optimizer step")
        self._keep_32bit_ids.add(id(param))

    # ------------------------------------------------------------ state

    def _uses_8bit(self, param: torch.Tensor, group: dict[str, Any]) -> bool:
        return (
            group["optim_bits"] == 8
            and param.numel() >= group["min_8bit_size"]
            and id(param) not in self._keep_32bit_ids
            and getattr(param, _OPTIM_BITS_ATTR, 8) != 32
        )

    def _code_book(self, device: torch.device, signed: bool) -> CodeBook:
        key = (device, signed)
        if key not in self._books:
            code_map = dynamic_map(signed, device)
            # The one unsigned state is Adam's second moment, the update's denominator: a
            # positive v never rounds to code 0 (see bytetune.kernels.optim_update).
            self._books[key] = CodeBook.of(code_map) if signed else CodeBook.for_denominator(code_map)
        return self._books[key]

    def _state_signedness(self) -> tuple[bool, ...]:
        # First moments change sign; Adam's second moment does not.
        return (True, False)[: N_STATES[self.KIND]]

    def _init_state(self, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        # The 8/32-bit choice looks at the whole parameter (every rank decides alike); the states
        # cover this rank's shard.
        uses_8bit = self._uses_8bit(param, group)
        local = _local(param)
        state["step"] = 0
        for index, signed in enumerate(self._state_signedness(), start=1):
            if uses_8bit:
                zero_code = int(torch.searchsorted(dynamic_map(signed), 0.0))
                state[f"state{index}"] = torch.full(
                    (local.numel(),), zero_code, dtype=torch.uint8, device=local.device
                )
                state[f"absmax{index}"] = torch.zeros(
                    n_blocks(local.numel(), group["block_size"]), dtype=torch.float32, device=local.device
                )
            else:
                state[f"state{index}"] = torch.zeros(local.shape, dtype=torch.float32, device=local.device)

    # ------------------------------------------------------------ step

    def _scalars(self, group: dict[str, Any], step: int) -> UpdateScalars:
        raise NotImplementedError

    def _nesterov(self, group: dict[str, Any]) -> bool:
        return False

    @staticmethod
    def _check_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
        if grad.is_sparse:
            raise RuntimeError(
                "bytetune 8-bit optimizers do not support sparse gradients; use a dense embedding "
                "(sparse=False) or torch.optim.SparseAdam for that parameter"
            )
        if param.is_complex() or grad.is_complex():
            raise RuntimeError(
                "bytetune 8-bit optimizers do not support complex parameters; optimize "
                "torch.view_as_real(param) instead"
            )
        if param.dtype not in _SUPPORTED_PARAM_DTYPES:
            raise TypeError(f"parameter dtype {param.dtype} is not supported; use float32, bfloat16 or float16")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # One update call per (8-bit or not, step count, device): the scalars depend on the
            # step, which differs only for params that joined late or skipped steps.
            batches: dict[tuple[bool, int, torch.device], list[tuple[torch.Tensor, torch.Tensor, dict]]] = {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                # A sharded parameter is updated shard by shard: the update is elementwise.
                local, grad = _local(param), _local(param.grad)
                self._check_grad(local, grad)
                state = self.state[param]
                if not state:
                    self._init_state(param, group, state)
                state["step"] += 1
                if local.numel() == 0:  # more ranks than rows: this rank holds nothing of it
                    continue
                key = (state["state1"].dtype == torch.uint8, state["step"], local.device)
                batches.setdefault(key, []).append((local, grad, state))
            for (is_8bit, step, device), items in batches.items():
                scalars = self._scalars(group, step)
                if is_8bit:
                    self._step_8bit(items, group, scalars, device)
                else:
                    self._step_32bit(items, group, scalars)
        return loss

    def _step_8bit(self, items: list[tuple[torch.Tensor, torch.Tensor, dict]], group, scalars: UpdateScalars,
                   device: torch.device) -> None:
        params, grads, states = zip(*items)
        quantized = [
            QuantizedStates(
                [s[f"state{index}"] for s in states],
                [s[f"absmax{index}"] for s in states],
                self._code_book(device, signed),
            )
            for index, signed in enumerate(self._state_signedness(), start=1)
        ]
        optimizer_update_8bit(
            self.KIND, scalars, list(params), list(grads), *quantized,
            nesterov=self._nesterov(group), block_size=group["block_size"],
        )  # fmt: skip

    def _step_32bit(self, items: list[tuple[torch.Tensor, torch.Tensor, dict]], group, scalars: UpdateScalars) -> None:
        params, grads, states = zip(*items)
        optimizer_update_32bit(
            self.KIND, scalars, list(params), list(grads), [s["state1"] for s in states],
            [s["state2"] for s in states] if N_STATES[self.KIND] == 2 else None, self._nesterov(group),
        )  # fmt: skip

    # ------------------------------------------------------------ state dict

    def init_states(self) -> None:
        """Create every parameter's (zero) states now instead of at its first step: what a
        sharded checkpoint is loaded into (``torch.distributed.checkpoint`` fills a template)."""
        for group in self.param_groups:
            for param in group["params"]:
                if not self.state[param]:
                    self._init_state(param, group, self.state[param])

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        # torch numbers the parameters in param_group order; the state is keyed by that number
        for pid, param in enumerate(params):
            if _is_sharded(param) and pid in state_dict["state"]:
                state_dict["state"][pid] = {
                    key: _sharded_state(value, key, param, self._group_of(param)["block_size"])
                    for key, value in state_dict["state"][pid].items()
                }
        return state_dict

    def _group_of(self, param: torch.Tensor) -> dict[str, Any]:
        return next(group for group in self.param_groups if any(p is param for p in group["params"]))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        saved_groups = {pid: group for group in state_dict["param_groups"] for pid in group["params"]}
        params = [p for group in self.param_groups for p in group["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(
                f"state dict has {len(saved_ids)} parameters but this optimizer has {len(params)}; "
                "build the optimizer over the same parameters in the same order"
            )
        state_dict = {**state_dict, "state": dict(state_dict["state"])}
        for pid, param in zip(saved_ids, params):
            if pid in state_dict["state"]:
                saved = state_dict["state"][pid]
                if _is_sharded(param):
                    saved = {key: _local_state(value, key, param, saved_groups[pid]["block_size"]) for key, value in saved.items()}
                    state_dict["state"][pid] = saved
                elif any(_is_sharded(value) for value in saved.values() if isinstance(value, torch.Tensor)):
                    raise ValueError(
                        f"optimizer state of parameter {pid} is sharded (saved under FSDP) but the parameter is not: "
                        "load it into the same FSDP-sharded model"
                    )
                self._check_saved_state(saved, _local(param), saved_groups[pid], pid)
        super().load_state_dict(state_dict)
        # torch casts float states to the param dtype (lossy for bf16 params): restore them exactly.
        for pid, param in zip(saved_ids, params):
            if pid in state_dict["state"]:
                restored = self.state[param]
                for key, value in state_dict["state"][pid].items():
                    if isinstance(value, torch.Tensor):
                        restored[key] = value.to(device=_local(param).device, copy=True)

    def _check_saved_state(self, saved: dict[str, Any], param: torch.Tensor, group, pid) -> None:
        where = f"optimizer state of parameter {pid} (shape {tuple(param.shape)})"
        for index in range(1, N_STATES[self.KIND] + 1):
            state = saved.get(f"state{index}")
            if not isinstance(state, torch.Tensor):
                raise ValueError(f"{where}: missing tensor 'state{index}'; was it saved by {type(self).__name__}?")
            if state.dtype == torch.uint8:
                absmax = saved.get(f"absmax{index}")
                expected_blocks = n_blocks(param.numel(), group["block_size"])
                if state.shape != (param.numel(),):
                    raise ValueError(
                        f"{where}: 8-bit 'state{index}' has shape {tuple(state.shape)}, expected "
                        f"({param.numel()},); the state dict belongs to other parameters"
                    )
                if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.shape != (
                    expected_blocks,
                ):
                    got = "missing" if not isinstance(absmax, torch.Tensor) else f"{tuple(absmax.shape)} {absmax.dtype}"
                    raise ValueError(
                        f"{where}: 'absmax{index}' must be float32 of shape ({expected_blocks},) for "
                        f"block_size {group['block_size']}, got {got}"
                    )
            elif state.dtype == torch.float32:
                if state.shape != param.shape:
                    raise ValueError(
                        f"{where}: 32-bit 'state{index}' has shape {tuple(state.shape)}, expected "
                        f"{tuple(param.shape)}; the state dict belongs to other parameters"
                    )
            else:
                raise ValueError(f"{where}: 'state{index}' has dtype {state.dtype}; expected uint8 (8-bit) or float32")
        if not isinstance(saved.get("step"), int):
            raise ValueError(f"{where}: 'step' must be an int, got {type(saved.get('step')).__name__}")


class Adam8bit(_BlockwiseOptimizer):
    """Adam with block-wise 8-bit states; ``weight_decay`` is L2 (added to the gradient) as in
    ``torch.optim.Adam``."""

    KIND = UpdateKind.ADAM
    _DECOUPLED = False

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        optim_bits: int = 8,
        min_8bit_size: int = 4096,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ):
        _check_betas(betas)
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, optim_bits, min_8bit_size, block_size)

    def _scalars(self, group, step):
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        return UpdateScalars(
            beta1=beta1,
            one_minus_beta1=1 - beta1,
            beta2=beta2,
            one_minus_beta2=1 - beta2,
            eps=group["eps"],
            l2_decay=0.0 if self._DECOUPLED else wd,
            param_decay=1 - lr * wd if self._DECOUPLED else 1.0,
            step_size=lr / (1 - beta1**step),
            bias_correction2_sqrt=math.sqrt(1 - beta2**step),
        )


class AdamW8bit(Adam8bit):
    """AdamW with block-wise 8-bit states: decoupled weight decay ``p *= 1 - lr * wd``."""

    _DECOUPLED = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        optim_bits: int = 8,
        min_8bit_size: int = 4096,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ):
        super().__init__(
            params, lr, betas, eps, weight_decay,
            optim_bits=optim_bits, min_8bit_size=min_8bit_size, block_size=block_size,
        )  # fmt: skip


class SGD8bit(_BlockwiseOptimizer):
    """Momentum SGD with a block-wise 8-bit momentum buffer, torch.optim.SGD semantics (L2 weight
    decay, dampening, Nesterov, buffer = gradient on the first step). Plain SGD has no state to
    quantize, so ``momentum`` must be > 0."""

    KIND = UpdateKind.MOMENTUM

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        optim_bits: int = 8,
        min_8bit_size: int = 4096,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ):
        if momentum <= 0.0:
            raise ValueError(
                f"SGD8bit needs momentum > 0 (got {momentum}): without momentum there is no state to "
                "quantize; use torch.optim.SGD"
            )
        if nesterov and dampening != 0.0:
            raise ValueError("Nesterov momentum requires dampening=0 (as in torch.optim.SGD)")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults, optim_bits, min_8bit_size, block_size)

    def _nesterov(self, group):
        return group["nesterov"]

    def _scalars(self, group, step):
        first = step == 1
        return UpdateScalars(
            lr=group["lr"],
            beta1=0.0 if first else group["momentum"],
            one_minus_beta1=1.0 if first else 1 - group["dampening"],
            l2_decay=group["weight_decay"],
            momentum=group["momentum"],
        )


class Lion8bit(_BlockwiseOptimizer):
    """Lion (arXiv 2302.06675) with a block-wise 8-bit momentum; decoupled weight decay."""

    KIND = UpdateKind.LION

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        optim_bits: int = 8,
        min_8bit_size: int = 4096,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ):
        _check_betas(betas)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        super().__init__(params, defaults, optim_bits, min_8bit_size, block_size)

    def _scalars(self, group, step):
        beta1, beta2 = group["betas"]
        return UpdateScalars(
            lr=group["lr"],
            beta1=beta1,
            one_minus_beta1=1 - beta1,
            beta2=beta2,
            one_minus_beta2=1 - beta2,
            param_decay=1 - group["lr"] * group["weight_decay"],
        )


def _shard_rows(param: torch.Tensor) -> int:
    """Rows of dim 0 on the ranks holding the most (FSDP2 splits dim 0 as torch.chunk does)."""
    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise NotImplementedError(
            f"bytetune optimizers shard states like FSDP2 (Shard(0) over a 1-D mesh); this parameter is "
            f"placed {tuple(param.placements)} over a {param.device_mesh.ndim}-D mesh"
        )
    return -(-param.shape[0] // param.device_mesh.size())


def _sharded_state(value: Any, key: str, param: torch.Tensor, block_size: int) -> Any:
    """One local state of a sharded parameter as a DTensor that spans every rank's state."""
    if not isinstance(value, torch.Tensor):
        return value  # the step count: the same on every rank
    mesh = param.device_mesh
    if key.startswith("absmax"):
        # Per-shard blocks: one row per rank, padded to the blocks of the longest shard.
        longest = n_blocks(_shard_rows(param) * math.prod(param.shape[1:]), block_size)
        row = torch.zeros(1, longest, dtype=value.dtype, device=value.device)
        row[0, : value.numel()] = value
        return DTensor.from_local(row, mesh, [Shard(0)], run_check=False, shape=(mesh.size(), longest), stride=(longest, 1))
    local = _local(param)
    # 8-bit codes (one per element, flat) and 32-bit states both take the parameter's layout.
    return DTensor.from_local(
        value.reshape(local.shape), mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def _local_state(value: Any, key: str, param: torch.Tensor, block_size: int) -> Any:
    """The inverse of :func:`_sharded_state`: this rank's state in the optimizer's own layout."""
    if not _is_sharded(value):
        return value
    local = value.to_local()
    numel = _local(param).numel()
    if key.startswith("absmax"):
        return local[0, : n_blocks(numel, block_size)].contiguous()
    if local.dtype == torch.uint8:
        return local.reshape(-1)
    return local


def _check_betas(betas) -> None:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of optimizer state tensors per element of the parameters that have state."""
    state_bytes = 0
    n_params = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            n_params += _local(param).numel()
            state_bytes += sum(
                v.numel() * v.element_size() for k, v in state.items() if isinstance(v, torch.Tensor) and k != "step"
            )
    if n_params == 0:
        raise ValueError("the optimizer has no state yet; call step() once before measuring it")
    return state_bytes / n_params
