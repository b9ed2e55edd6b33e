"""Layer-by-layer streaming quantization: read one decoder layer, quantize it, write it, move on.

Peak memory is about one layer (float, plus its output) and the calibration activations, never
the whole model. Without calibration (w8a16, w8a8_dynamic RTN) no module is built at all:
tensors go straight from the input shards through the method to the output shards. With
calibration, layer i runs on the outputs of the already-quantized layers before it (see
quant/methods.py for the interface a method implements). With `checkpoints`, a killed run
resumes after the last layer it finished (quant/resume.py).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gcupipe.errors import StageError
from gcupipe.quant.archs import ArchMap, arch_for, fused_key
from gcupipe.quant.checkpoint import CheckpointReader, layer_relative, load_config
from gcupipe.quant.folding import fold_scale
from gcupipe.quant.methods import (
    LayerCalibration,
    LayerSpec,
    LayerView,
    LinearJob,
    QuantMethod,
    ScalingGroup,
)
from gcupipe.quant.observers import MinMaxObserver, scale_offset_from_range
from gcupipe.quant.precision import CalibrationDtype, calibration_dtype
from gcupipe.quant.resume import LayerCheckpoints
from gcupipe.quant.scheme import KVCacheScale, QuantizedLinear
from gcupipe.quant.threads import streaming_threads, torch_threads

if TYPE_CHECKING:
    import torch

SpecResolver = Callable[[str], LayerSpec | None]  # full module prefix -> spec (None = float)


class QuantizedSink(Protocol):
    """Where the quantized model goes, in checkpoint order (every format writer is one)."""

    def add_float(self, name: str, tensor: torch.Tensor) -> None: ...

    def add_linear(self, prefix: str, layer: QuantizedLinear) -> None: ...

    def add_kv_cache(self, attn_prefix: str, scale: KVCacheScale, kv_channels: int) -> None: ...

    def end_layer(self) -> None: ...

    def state(self) -> dict[str, Any] | None: ...

    def restore(self, state: dict[str, Any]) -> None: ...

    def when_written(self, callback: Callable[[], None]) -> None: ...


@dataclass
class QuantizeReport:
    """What was done, for the stage's outputs and `inspect`-like summaries."""

    layer_types: dict[str, str] = field(default_factory=dict)  # prefix -> QuantType value
    float_linears: list[str] = field(default_factory=list)
    fallbacks: dict[str, str] = field(default_factory=dict)  # prefix -> why (e.g. no tokens)
    kv_cache_layers: int = 0
    input_bytes: int = 0
    # calibrated MoE models: calibration tokens the router sent to each routed expert
    expert_tokens: dict[str, int] = field(default_factory=dict)  # expert prefix -> tokens


def _batches(tensor: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(tensor.split(size, dim=0))


def _zeros_out(out_features: int, x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(*x.shape[:-1], out_features)


class _Capture:
    """Forward hooks recording the inputs of the layer's quantizable linears.

    The captured pass's output is thrown away, so the linears in `skip` (the layer's output
    linears) record their input and return zeros instead of multiplying."""

    def __init__(self, layer: Any, names: list[str], dtype: torch.dtype, skip: set[str]):
        self.dtype = dtype  # inputs are kept in the forwards' compute dtype
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.in_features: dict[str, int] = {}
        self.handles = []
        self.skipped = []
        self._last: tuple[Any, torch.Tensor] | None = None  # (input seen, its converted rows)
        for name in names:
            module = layer.get_submodule(name)
            self.in_features[name] = module.weight.shape[1]
            self.handles.append(module.register_forward_hook(self._hook(name)))
            if name in skip:
                module.forward = partial(_zeros_out, module.weight.shape[0])
                self.skipped.append(module)

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            if self._last is None or self._last[0] is not x:  # q/k/v (gate/up) read one x:
                self._last = (x, x.detach().reshape(-1, x.shape[-1]).to(self.dtype))
            self.inputs[name].append(self._last[1])  # convert it once, keep one tensor

        return hook

    def remove(self) -> LayerCalibration:
        import torch

        for handle in self.handles:
            handle.remove()
        for module in self.skipped:
            del module.forward  # the class's forward again
        self._last = None
        joined: dict[tuple[int, ...], torch.Tensor] = {}
        calib = LayerCalibration()
        for name, parts in self.inputs.items():
            # q/k/v share one input tensor: join it once
            key = (self.in_features[name], *(id(p) for p in parts))
            if key not in joined:  # an expert the router never chose saw no token at all
                joined[key] = torch.cat(parts) if parts else torch.empty(0, self.in_features[name])
            calib.inputs[name] = joined[key]
        calib.tokens = max((t.shape[0] for t in calib.inputs.values()), default=0)
        return calib


def quantize_model(
    model_dir: Path,
    writer: QuantizedSink,
    method: QuantMethod,
    resolve: SpecResolver,
    calib_tokens: torch.Tensor | None = None,
    kv_cache: bool = False,
    kv_symmetric: bool = False,
    batch_size: int = 8,
    on_layer: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = print,
    device: str = "cpu",
    checkpoints: LayerCheckpoints | None = None,
    compute_dtype: CalibrationDtype = "auto",
) -> QuantizeReport:
    """Quantize `model_dir` into `writer` layer by layer. `calib_tokens` [samples, seq_len] is
    required when the method needs calibration or `kv_cache` is set (`kv_symmetric`: K and V
    ranges without a zero point, for loaders that read none). `device` (cpu, cuda, auto) is
    where calibrated layers run; tensors come back to the CPU to be written. `checkpoints`:
    save resume points there, and resume from the last one an interrupted run left.
    `compute_dtype`: what the calibration forwards' matmuls run in (quant/precision.py)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    config = load_config(model_dir)
    arch = arch_for(config.model_type)
    reader = CheckpointReader(model_dir)
    report = QuantizeReport()
    needs_forward = method.calibrated or kv_cache
    if needs_forward and calib_tokens is None:
        raise StageError("this method (or kv_cache: int8) needs calibration data")
    resumed = checkpoints.load() if checkpoints is not None else None
    hidden: Any = None
    float_hidden: Any = None  # the float model's activations (methods with float_samples)
    position_embeddings: Any = None
    start = 0
    if resumed is not None:
        writer.restore(resumed.writer)
        report = QuantizeReport(**resumed.report)
        hidden = None if resumed.hidden is None else resumed.hidden.to(device)
        if resumed.float_hidden is not None:
            float_hidden = resumed.float_hidden.to(device)
        start = resumed.layers_done
        log(
            f"resuming at layer {start}/{reader.num_layers}: layers 0-{start - 1} were "
            "finished by an interrupted run with the same cache key"
        )
    if needs_forward:
        assert calib_tokens is not None
        from gcupipe.quant.layer_module import rotary_embeddings

        if hidden is None:
            embed = reader.tensor("model.embed_tokens.weight").float()
            hidden = torch.nn.functional.embedding(calib_tokens, embed).to(device)
            del embed
            samples = method.float_samples(*calib_tokens.shape)
            if samples:
                float_hidden = hidden[:samples].clone()
        position_embeddings = _to_device(rotary_embeddings(config, calib_tokens.shape[1]), device)
    dtype = calibration_dtype(compute_dtype, device)

    threads = torch.get_num_threads() if needs_forward else streaming_threads()
    with torch.no_grad(), torch_threads(threads):
        if start < reader.num_layers:
            reader.read_ahead(reader.layers[start])
        if resumed is None:
            for name in reader.globals:
                _write_global(name, reader, writer, method, resolve, report)
            reader.release()
        for index in range(reader.num_layers):
            if index < start:
                if on_layer is not None:
                    on_layer(index, reader.num_layers)
                continue
            names = reader.layers[index]
            tensors = {layer_relative(n)[1]: reader.tensor(n) for n in names}  # type: ignore[index]
            report.input_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            reader.release()
            if index + 1 < reader.num_layers:
                reader.read_ahead(reader.layers[index + 1])
            if needs_forward:
                hidden, float_hidden = _quantize_layer_calibrated(
                    config,
                    arch,
                    index,
                    tensors,
                    writer,
                    method,
                    resolve,
                    report,
                    hidden,
                    float_hidden,
                    position_embeddings,
                    kv_cache,
                    kv_symmetric,
                    batch_size,
                    dtype,
                )
            else:
                _quantize_layer_plain(arch, index, tensors, writer, method, resolve, report)
            del tensors
            writer.end_layer()
            if checkpoints is not None:
                state = writer.state()
                if state is not None:  # a snapshot, saved once the parts it lists are on disk
                    snapshot = copy.deepcopy((report, state))
                    writer.when_written(
                        partial(checkpoints.save, index + 1, *snapshot, hidden, float_hidden)
                    )
            if on_layer is not None:
                on_layer(index, reader.num_layers)
    for prefix, why in report.fallbacks.items():
        log(f"{prefix}: {why}")
    return report


def _write_global(
    name: str,
    reader: CheckpointReader,
    writer: QuantizedSink,
    method: QuantMethod,
    resolve: SpecResolver,
    report: QuantizeReport,
) -> None:
    tensor = reader.tensor(name)
    report.input_bytes += tensor.numel() * tensor.element_size()
    prefix, _, leaf = name.rpartition(".")
    spec = (
        resolve(prefix)
        if leaf == "weight" and tensor.ndim == 2 and name == "lm_head.weight"
        else None
    )
    if spec is None:
        writer.add_float(name, tensor.clone())  # own the memory: see CheckpointReader.tensor
        return
    q = method.quantize_layer(prefix, tensor.float(), None, None, spec)
    writer.add_linear(prefix, q)
    report.layer_types[prefix] = q.quant_type.value


def _linear_specs(
    arch: ArchMap,
    index: int,
    tensors: dict[str, Any],
    resolve: SpecResolver,
    report: QuantizeReport,
) -> dict[str, LayerSpec]:
    """In-layer linear name -> spec, for the linears that get quantized; checks fused groups."""
    specs: dict[str, LayerSpec] = {}
    groups: dict[str, set[str]] = {}
    for rel in tensors:
        module, _, leaf = rel.rpartition(".")
        if leaf != "weight" or not arch.is_linear(module):
            continue
        full = f"{arch.layer_prefix}.{index}.{module}"
        spec = resolve(full)
        key = fused_key(arch, module)
        kind = "float" if spec is None else _kind(spec)
        if key is not None:
            groups.setdefault(key, set()).add(kind)
            if len(groups[key]) > 1:
                raise StageError(
                    f"{full} would be {kind} but the modules it is fused with are "
                    f"{sorted(groups[key] - {kind})[0]}: fused modules (q/k/v, gate/up, "
                    f"q_a/kv_a, experts) must share one type; fix ignore/overrides"
                )
        if spec is None:
            report.float_linears.append(full)
        else:
            specs[module] = spec
    return specs


def _kind(spec: LayerSpec) -> str:
    return f"w{spec.bits}/g{spec.group_size}/{spec.activation.value}"


def _emit_layer(
    arch: ArchMap,
    index: int,
    tensors: dict[str, Any],
    quantized: dict[str, Any],
    writer: QuantizedSink,
    report: QuantizeReport,
) -> None:
    prefix = f"{arch.layer_prefix}.{index}"
    for rel, tensor in tensors.items():
        module, _, leaf = rel.rpartition(".")
        if module in quantized:
            if leaf == "weight":
                q: QuantizedLinear = quantized[module]
                writer.add_linear(f"{prefix}.{module}", q)
                report.layer_types[f"{prefix}.{module}"] = q.quant_type.value
                if "fallback" in q.extra:
                    report.fallbacks[f"{prefix}.{module}"] = str(q.extra["fallback"])
            continue  # the bias travels inside the QuantizedLinear
        writer.add_float(f"{prefix}.{rel}", tensor.clone())  # see CheckpointReader.tensor


def _quantize_layer_plain(
    arch: ArchMap,
    index: int,
    tensors: dict[str, Any],
    writer: QuantizedSink,
    method: QuantMethod,
    resolve: SpecResolver,
    report: QuantizeReport,
) -> None:
    specs = _linear_specs(arch, index, tensors, resolve, report)
    quantized = {}
    for module, spec in specs.items():
        bias = tensors.get(f"{module}.bias")
        weight = tensors[f"{module}.weight"]
        quantized[module] = method.quantize_layer(
            f"{arch.layer_prefix}.{index}.{module}",
            weight if method.accepts_low_precision else weight.float(),
            None if bias is None else bias.float(),
            None,
            spec,
        )
        tensors[f"{module}.weight"] = None  # free the input weight as soon as it is quantized
    _emit_layer(arch, index, tensors, quantized, writer, report)


def _run_layer(
    layer: Any,
    hidden: torch.Tensor,
    position_embeddings: Any,
    batch_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The layer's outputs for `hidden`; its matmuls under `dtype` autocast (the weights, the
    residual stream and the outputs stay fp32)."""
    import torch

    outputs = []
    autocast = torch.autocast(hidden.device.type, dtype, enabled=dtype != torch.float32)
    with autocast:
        for batch in _batches(hidden, batch_size):
            out = layer(batch, attention_mask=None, position_embeddings=position_embeddings)
            outputs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outputs).float()


def _quantize_layer_calibrated(
    config: Any,
    arch: ArchMap,
    index: int,
    tensors: dict[str, Any],
    writer: QuantizedSink,
    method: QuantMethod,
    resolve: SpecResolver,
    report: QuantizeReport,
    hidden: torch.Tensor,
    float_hidden: torch.Tensor | None,
    position_embeddings: Any,
    kv_cache: bool,
    kv_symmetric: bool,
    batch_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize decoder layer `index` on `hidden` (the quantized model's activations entering
    it); returns the activations leaving it, of the quantized model and (when the method has
    float_samples) of the float model, from `float_hidden`."""
    import torch

    from gcupipe.quant.layer_module import (
        attach_kv_observers,
        build_layer,
        detach_kv_observers,
    )

    specs = _linear_specs(arch, index, tensors, resolve, report)
    layer = build_layer(config, index, tensors).to(hidden.device)
    float_inputs: dict[str, torch.Tensor] = {}
    # the float model's inputs pair with the quantized model's only outside routed experts (the
    # two models route differently)
    paired = [m for m in specs if not arch.is_routed(m)]
    tokens = hidden.shape[0] * hidden.shape[1]
    if float_hidden is not None and not any(
        method.float_targets_for(tokens, tensors[f"{m}.weight"].shape[1]) for m in paired
    ):  # too few tokens for any linear here: decoder layers repeat, so drop the float pass
        float_hidden = None
    if float_hidden is not None:  # the float layer on the float model's activations
        capture = _Capture(layer, paired, dtype, skip=set())
        float_hidden = _run_layer(layer, float_hidden, position_embeddings, batch_size, dtype)
        float_inputs = capture.remove().inputs
        del capture
    view = LayerView(
        module=layer,
        smooth_groups=list(arch.smooth_groups),
        layer_index=index,
        linear_pairs=list(arch.linear_pairs),
    )
    observers = (MinMaxObserver(), MinMaxObserver())
    if kv_cache:
        attach_kv_observers(layer, observers)
    if method.in_forward:
        quantized, hidden = _quantize_in_forward(
            arch,
            index,
            view,
            specs,
            method,
            report,
            hidden,
            float_inputs,
            position_embeddings,
            dtype,
        )
    else:
        quantized = _quantize_captured(
            arch,
            index,
            view,
            specs,
            method,
            report,
            hidden,
            float_inputs,
            position_embeddings,
            batch_size,
            dtype,
        )
        hidden = _run_layer(layer, hidden, position_embeddings, batch_size, dtype)
    float_inputs.clear()
    if kv_cache:
        detach_kv_observers(layer)
    # the float tensors written are the (possibly smoothed) ones of the module
    state = layer.state_dict()
    final = {}
    for rel, original in tensors.items():
        module, _, _leaf = rel.rpartition(".")
        if module in quantized:
            final[rel] = original
        elif rel in state:
            final[rel] = state[rel].to(original.dtype)
        else:
            final[rel] = original
    _emit_layer(arch, index, final, quantized, writer, report)
    if kv_cache:
        _emit_kv(config, arch, index, observers, kv_symmetric, writer, report)
    del layer
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return hidden, float_hidden


def _count_expert_tokens(
    arch: ArchMap, index: int, module: str, inputs: torch.Tensor, report: QuantizeReport
) -> None:
    expert = re.fullmatch(arch.expert_input, module) if arch.expert_input else None
    if expert is not None:
        report.expert_tokens[f"{arch.layer_prefix}.{index}.{expert[1]}"] = inputs.shape[0]


def _quantize_captured(
    arch: ArchMap,
    index: int,
    view: LayerView,
    specs: dict[str, LayerSpec],
    method: QuantMethod,
    report: QuantizeReport,
    hidden: torch.Tensor,
    float_inputs: dict[str, torch.Tensor],
    position_embeddings: Any,
    batch_size: int,
    dtype: torch.dtype,
) -> dict[str, QuantizedLinear]:
    """Every linear's inputs captured in one pass (the float layer), then `prepare_layer` and
    `quantize_linears` over all of them; the module is left fake-quantized."""
    layer = view.module
    calib = LayerCalibration()
    if method.calibrated:  # (kv_cache alone observes K and V in the caller's pass)
        skip = {m for m in specs if any(re.fullmatch(p, m) for p in arch.output_linears)}
        capture = _Capture(layer, list(specs), dtype, skip)
        _run_layer(layer, hidden, position_embeddings, batch_size, dtype)
        calib = capture.remove()
        del capture
        for module, seen in calib.inputs.items():
            _count_expert_tokens(arch, index, module, seen, report)
        method.prepare_layer(view, calib)
    jobs = [
        LinearJob(
            module=module,
            name=f"{arch.layer_prefix}.{index}.{module}",
            linear=layer.get_submodule(module),
            inputs=calib.inputs.get(module) if method.calibrated else None,
            spec=spec,
            float_inputs=float_inputs.get(module),
        )
        for module, spec in specs.items()
    ]
    quantized: dict[str, QuantizedLinear] = {}
    for module, q in method.quantize_linears(jobs):
        quantized[module] = q
        _fake_quantize(layer.get_submodule(module), q)
    calib.inputs.clear()
    return quantized


def _fake_quantize(linear: Any, q: QuantizedLinear) -> None:
    """Later passes (and the next layer) see the quantized weights."""
    linear.weight.data = q.dequantize().to(linear.weight.device, linear.weight.dtype)


class _Flat:
    """A forward's activations as the methods read them: [tokens, k] in the compute dtype, one
    conversion per tensor however many linears read it (q/k/v)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._last: tuple[Any, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not x:
            self._last = (x, x.detach().reshape(-1, x.shape[-1]).to(self.dtype))
        return self._last[1]


def _quantize_in_forward(
    arch: ArchMap,
    index: int,
    view: LayerView,
    specs: dict[str, LayerSpec],
    method: QuantMethod,
    report: QuantizeReport,
    hidden: torch.Tensor,
    float_inputs: dict[str, torch.Tensor],
    position_embeddings: Any,
    dtype: torch.dtype,
) -> tuple[dict[str, QuantizedLinear], torch.Tensor]:
    """One forward of the layer over every calibration sample; each linear is quantized when the
    forward reaches it, on the inputs it receives (quant/methods.py). The linears reading a
    norm's whole output (q/k/v, gate/up) are quantized together when it appears, so a method can
    stack them. Returns the quantized linears and the layer's outputs."""
    import torch

    layer = view.module
    method.prepare_layer(view, LayerCalibration())
    quantized: dict[str, QuantizedLinear] = {}
    factors: dict[str, torch.Tensor] = {}  # reader -> s its input is divided by
    flat = _Flat(dtype)
    no_autocast = partial(torch.autocast, hidden.device.type, enabled=False)

    def scale_group(group: ScalingGroup, x: torch.Tensor) -> torch.Tensor | None:
        paired = [float_inputs[r] for r in group.readers if r in float_inputs]
        weight = torch.cat([layer.get_submodule(r).weight.detach().float() for r in group.readers])
        with no_autocast():
            s = method.group_scale(
                group, flat(x), paired[0] if paired else None, weight, specs[group.readers[0]]
            )
        if s is None:
            return None
        readers = [layer.get_submodule(r) for r in group.readers + group.passive]
        fold_scale(layer.get_submodule(group.producer), readers, s)
        if group.producer in quantized:
            quantized[group.producer].divide_rows(s)
        for name in group.readers + group.passive:
            factors[name] = s
        return s

    def quantize(names: list[str], x: torch.Tensor) -> None:
        inputs = flat(x)
        jobs = []
        for name in names:
            _count_expert_tokens(arch, index, name, inputs, report)
            float_x = float_inputs.get(name)
            if float_x is not None and name in factors:
                float_x = float_x / factors[name].to(float_x.dtype)
            linear = layer.get_submodule(name)
            job_name = f"{arch.layer_prefix}.{index}.{name}"
            jobs.append(LinearJob(name, job_name, linear, inputs, specs[name], float_x))
        with no_autocast():
            for name, q in method.quantize_linears(jobs):
                quantized[name] = q
                _fake_quantize(layer.get_submodule(name), q)

    def producer_hook(group: ScalingGroup | None, readers: list[str]) -> Callable[..., Any]:
        def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            s = None if group is None else scale_group(group, output)
            if s is not None:
                output = output / s.to(output.dtype)
            quantize(readers, output)
            return None if s is None else output

        return hook

    def reader_hook(name: str, group: ScalingGroup | None) -> Callable[..., Any]:
        def hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            x = args[0]
            if group is not None:  # the lone reader of a linear producer: its input is here
                s = factors.get(name) if name in quantized else scale_group(group, x)
                if s is not None:
                    x = x / s.to(x.dtype)
            if name not in quantized:
                quantize([name], x)
            return None if x is args[0] else (x, *args[1:])

        return hook

    groups = {g.producer: g for g in method.scaling_groups(view, list(specs))}
    modules = dict(layer.named_modules())
    norm_readers = {
        norm: [
            name
            for name in specs
            if not arch.is_routed(name) and any(re.fullmatch(p, name) for p in patterns)
        ]
        for norm, patterns in arch.smooth_groups
        if norm in modules
    }
    lone_reader = {g.readers[0]: g for g in groups.values() if g.producer in specs}
    producers = (set(groups) - set(specs)) | {n for n, readers in norm_readers.items() if readers}
    handles = [
        modules[p].register_forward_hook(producer_hook(groups.get(p), norm_readers.get(p, [])))
        for p in producers
    ]
    for name in specs:
        hook = reader_hook(name, lone_reader.get(name))
        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        hidden = _run_layer(layer, hidden, position_embeddings, hidden.shape[0], dtype)
    finally:
        for handle in handles:
            handle.remove()
    for name in specs:  # experts the router sent no calibration token: the method falls back
        if name not in quantized:
            weight = modules[name].weight
            quantize([name], torch.empty(0, weight.shape[1], dtype=dtype, device=hidden.device))
    return {name: quantized[name] for name in specs}, hidden


def _emit_kv(
    config: Any,
    arch: ArchMap,
    index: int,
    observers: tuple[Any, Any],
    symmetric: bool,
    writer: QuantizedSink,
    report: QuantizeReport,
) -> None:
    import torch

    values = []
    for obs in observers:
        lo, hi = obs.range()
        scale, offset = scale_offset_from_range(torch.tensor(lo), torch.tensor(hi), 8, symmetric)
        values += [float(scale), float(offset)]
    kv = KVCacheScale(index, values[0], values[1], values[2], values[3])
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_kv_cache(f"{arch.layer_prefix}.{index}.self_attn", kv, heads * head_dim)
    report.kv_cache_layers += 1


def _to_device(value: Any, device: str) -> Any:
    if isinstance(value, tuple | list):
        return type(value)(v.to(device) for v in value)
    return value.to(device)


def compile_patterns(patterns: list[str]) -> list[re.Pattern[str]]:
    return [re.compile(p) for p in patterns]
