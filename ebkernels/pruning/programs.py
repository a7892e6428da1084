"""A pruned network as a ``torch.export`` program: how the ticket of a model that ebkernels cannot
rebuild by name (a user's own ``nn.Module``) loads without the user's class.

``export_program`` exports the network in eval mode (BatchNorm reads its running statistics, dropout
is off) with a free batch dimension and returns the bytes of ``torch.export.save`` as a uint8 tensor,
so the ticket file stays plain data and its SHA-256 digest covers the program too. The program is for
inference and evaluation: its module refuses ``.train()`` (torch.export bakes the eval-mode graph in);
retraining goes through ``load_ticket(path, model=...)``.

``load_program`` is where care is needed. A ``.pt2`` archive is more than data: ``torch.export.load``
unpickles payloads marked ``use_pickle`` and custom objects, falls back to ``weights_only=False``
when a tensor file does not load as plain data, evaluates shape expressions with ``sympy.sympify``
(an ``eval``), ``exec``-s the program's guard code, and turns names into Python source when it builds
the module. A digest recomputed by whoever changed the file proves nothing, so before torch reads the
archive this module accepts only what an exported CNN consists of and refuses the rest, naming it:

- members: JSON (graph, payload configs), raw tensor bytes named by a config, sample inputs that load
  with ``weights_only=True``, the archive's version files; no pickled payload, no custom object, no
  AOTInductor package, no guard code;
- in the graph JSON: operator targets that name registered ``torch.ops`` operators (or Python's
  arithmetic on sizes), shape expressions over size symbols and sympy's arithmetic only, pytree specs of tuples,
  lists and dicts, and every other string a plain name (letters, digits, ``_ . + -``). Each node's
  metadata (source lines, module paths: text for debugging only) is dropped before loading.
"""
from __future__ import annotations

import copy
import io
import json
import re
import zipfile

import torch
from torch import nn

__all__ = ["export_program", "load_program", "ProgramRefused"]


class ProgramRefused(ValueError):
    """A program archive holding something other than what ``export_program`` writes."""


def export_program(model: nn.Module, input_shape) -> torch.Tensor:
    """The eval-mode ``torch.export`` program of ``model`` for inputs ``(N, *input_shape)`` (any N),
    as the uint8 bytes of ``torch.export.save``. Int8 layers are exported as the float layers they
    wrap (the ticket is the float network that is retrained). The model itself is left untouched."""
    from ..convert import dequantize_model
    from ..modules import QConv2d, QLinear

    net = copy.deepcopy(model).cpu().eval()
    if any(isinstance(m, (QConv2d, QLinear)) for m in net.modules()):
        net = dequantize_model(net)
    param = next(net.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    example = torch.randn((2, *input_shape), dtype=dtype, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},),
                                          strict=False)
    except Exception as exc:
        raise ValueError(f"torch.export cannot export this {type(model).__name__} for inputs of shape (N, "
                         f"{', '.join(map(str, input_shape))}): {type(exc).__name__}: {str(exc).strip()[:600]}; "
                         f"save_ticket(..., export=False) saves the ticket without its program (it then loads "
                         f"with load_ticket(path, model=...))") from None
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


# ------------------------------------------------------------------------------------ the archive check

_PLAIN = re.compile(r"[A-Za-z0-9_.+\-]*")
_SIZE_OPERATORS = {"add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "pow", "abs", "getitem",
                   "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_"}
_OPERATOR = re.compile(r"torch\.ops\.[a-z][a-z0-9_]*\.[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)?")
_TARGET = re.compile(r"torch\.sym_[a-z]+|math\.(ceil|floor|trunc|sqrt)"
                     r"|_operator\.(" + "|".join(sorted(_SIZE_OPERATORS)) + ")")
# what shape expressions may name: size symbols (s0, u3, ...) and sympy / torch.utils._sympy arithmetic
_SYMBOL = re.compile(r"[a-z]+[0-9]+")
_SYMPY_NAMES = {
    "Symbol", "Integer", "Float", "Rational", "positive", "integer", "real", "nonnegative", "True", "False",
    "true", "false", "oo", "zoo", "nan", "Add", "Mul", "Pow", "Abs", "Max", "Min", "Mod", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "FloorDiv", "CeilDiv", "CleanDiv",
    "PythonMod", "ModularIndexing", "Where", "IntTrueDiv", "FloatTrueDiv", "TruncToInt", "TruncToFloat",
    "RoundToInt", "RoundDecimal", "ToFloat", "FloorToInt", "CeilToInt", "PowByNatural", "FloatPow",
    "Identity", "LShift", "RShift", "OpaqueUnaryFn_sqrt", "IsNonOverlappingAndDenseIndicator",
}
_EXPRESSION = re.compile(r"[A-Za-z0-9_ +\-*/%(),=<>!.']*")
_SPEC_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"}
_VERSION_FILES = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
                  "version", ".format_version", ".storage_alignment"}


def _refuse(path: str, what: str) -> ProgramRefused:
    return ProgramRefused(f"{path!r}: its exported program holds {what}, which an exported CNN does not need; "
                          "refused without loading it (a changed or hand-made file; use another copy of the ticket, "
                          "or load its weights into your model with load_ticket(path, model=...))")


def _is_operator(target: str) -> bool:
    """``torch.ops.<namespace>.<op>[.<overload>]`` naming a registered operator (not another attribute of
    ``torch.ops``, such as ``import_module``)."""
    if not _OPERATOR.fullmatch(target):
        return False
    obj = torch
    for part in target.split(".")[1:]:
        try:
            obj = getattr(obj, part)
        except (AttributeError, RuntimeError):
            return False
    return isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator))


def _check_expression(text: str, path: str) -> None:
    """A shape expression: size symbols, numbers and sympy arithmetic; quotes only around a symbol name."""
    bare = re.sub(r"'([a-z]+[0-9]+)'", r"\1", text)
    names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", bare)
    unknown = [n for n in names if n not in _SYMPY_NAMES and not _SYMBOL.fullmatch(n)]
    attribute = re.search(r"(?<![0-9])\.|\.(?![0-9])", bare)  # a dot only inside a number
    if "'" in bare or "__" in bare or attribute or not _EXPRESSION.fullmatch(bare) or unknown:
        raise _refuse(path, f"the shape expression {text[:80]!r}")


def _check_spec(text: str, path: str) -> None:
    """A pytree spec (JSON) of tuples, lists and dicts."""
    try:
        spec = json.loads(text)
    except ValueError:
        raise _refuse(path, f"an unreadable input/output spec {text[:80]!r}") from None
    stack = [spec]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "type" in item and item["type"] not in _SPEC_TYPES:
                raise _refuse(path, f"an input/output structure of type {item['type']!r}")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _clean_graph(node, path: str):
    """The graph JSON with node metadata dropped, every string checked (module docstring)."""
    if isinstance(node, list):
        return [_clean_graph(v, path) for v in node]
    if not isinstance(node, dict):
        if isinstance(node, str) and not _PLAIN.fullmatch(node):
            raise _refuse(path, f"the text {node[:80]!r}")
        return node
    out = {}
    for key, value in node.items():
        if not _PLAIN.fullmatch(key):
            raise _refuse(path, f"the field name {key[:80]!r}")
        if key == "metadata" and isinstance(value, dict):
            out[key] = {}
        elif key == "guards_code":
            if value:
                raise _refuse(path, "guard code (Python source that loading would execute)")
            out[key] = value
        elif key == "expr_str" and isinstance(value, str):
            _check_expression(value, path)
            out[key] = value
        elif key in ("in_spec", "out_spec") and isinstance(value, str):
            _check_spec(value, path)
            out[key] = value
        elif key == "target" and isinstance(value, str):
            if not (_TARGET.fullmatch(value) or _is_operator(value)):
                raise _refuse(path, f"the operator {value[:80]!r}")
            out[key] = value
        else:
            out[key] = _clean_graph(value, path)
    return out


def _check_payloads(config: dict, path: str, kind: str) -> set:
    """The raw files a weights/constants config names; refuses pickled payloads and custom objects."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _refuse(path, f"an unreadable {kind} config")
    files = set()
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _refuse(path, f"a pickled {kind} payload ({fqn!r})")
        name = meta.get("path_name")
        if not isinstance(name, str) or not re.fullmatch(r"(weight|tensor)_[0-9]+", name):
            raise _refuse(path, f"a {kind} payload {name!r} ({fqn!r}) that is not a plain tensor")
        files.add(name)
    return files


def _checked_archive(data: bytes, path: str) -> bytes:
    """The archive, checked member by member, with its graph JSON cleaned (module docstring)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = {i.filename: archive.read(i.filename) for i in archive.infolist() if not i.is_dir()}
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ValueError(f"{path!r}: its exported program is not a readable archive ({exc})") from None
    roots = {name.split("/", 1)[0] for name in members}
    if len(roots) != 1 or any("/" not in name for name in members):
        raise _refuse(path, "files outside one archive folder")
    root = roots.pop() + "/"
    raw, configs, rest = {}, {}, {}
    for name, content in members.items():
        rel = name[len(root):]
        if re.fullmatch(r"data/(weights|constants)/[A-Za-z0-9_]+_config\.json", rel):
            configs[rel] = content
        elif re.fullmatch(r"data/(weights|constants)/[A-Za-z0-9_]+", rel):
            raw[rel] = content
        else:
            rest[rel] = content
    allowed = set()
    for rel, content in configs.items():
        try:
            config = json.loads(content)
        except ValueError:
            raise _refuse(path, f"an unreadable {rel}") from None
        folder = rel.split("/")[1]
        allowed |= {f"data/{folder}/{f}" for f in _check_payloads(config, path, folder)}
    stray = sorted(set(raw) - allowed)
    if stray:
        raise _refuse(path, f"the file {stray[0]!r}")
    cleaned = {}
    for rel, content in rest.items():
        if rel in _VERSION_FILES:
            if len(content) > 64 or not _PLAIN.fullmatch(content.decode("ascii", "replace").strip()):
                raise _refuse(path, f"a version file {rel!r} with unexpected content")
        elif re.fullmatch(r"models/[A-Za-z0-9_]+\.json", rel):
            try:
                graph = json.loads(content)
            except ValueError:
                raise _refuse(path, f"an unreadable {rel}") from None
            cleaned[rel] = json.dumps(_clean_graph(graph, path)).encode()
        elif re.fullmatch(r"data/sample_inputs/[A-Za-z0-9_]+\.pt", rel):
            try:
                torch.load(io.BytesIO(content), weights_only=True)
            except Exception:
                raise _refuse(path, f"sample inputs that are not plain tensors ({rel})") from None
        else:
            raise _refuse(path, f"the file {rel!r}")
    if not any(rel.startswith("models/") for rel in rest):
        raise _refuse(path, "no model graph")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, content in members.items():
            z.writestr(name, cleaned.get(name[len(root):], content))
    return out.getvalue()


def load_program(blob: torch.Tensor, path: str, map_location=None):
    """The ``torch.export.ExportedProgram`` in ``blob`` (uint8 bytes from :func:`export_program`),
    checked first (module docstring); on ``map_location`` when that names a device."""
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"{path!r}: its program is not a byte tensor")
    data = _checked_archive(blob.cpu().numpy().tobytes(), path)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:
        raise ValueError(f"{path!r}: torch.export cannot load its program ({type(exc).__name__}: "
                         f"{str(exc).strip()[:300]}); it may come from a newer torch than {torch.__version__}") from exc
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        device = torch.device(map_location)
        if device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
    return program
