#!/usr/bin/env python3
"""Generates model/src/generated.rs from botocore's App Mesh model (appmesh 2019-01-25).

The Rust types mirror the model's shapes exactly (member names, required members, enums, unions),
and each gets a `Validate` impl that enforces every constraint the model states: lengths, ranges,
list sizes, patterns, and "exactly one member" for unions. Semantic rules (references, quotas) are
hand-written in agent/src/api.

Usage: .venv/bin/python scripts/gen_model.py [--check]
  --check: exit 1 if the committed file differs from what the model generates.
"""
import keyword
import re
import sys
from pathlib import Path

import botocore.session

OUT = Path(__file__).resolve().parent.parent / "model/src/generated.rs"
RUST_KEYWORDS = {"type", "match", "override", "ref", "mod", "self", "use", "where", "loop", "move", "box"}
PRIMITIVE = {"integer": "i64", "long": "i64", "boolean": "bool", "double": "f64", "float": "f64", "timestamp": "f64"}


def snake(name):
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", s).lower()
    return f"r#{s}" if s in RUST_KEYWORDS or keyword.iskeyword(s) and s in RUST_KEYWORDS else s


def variant(value):
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", value) if p]
    v = "".join(p[:1].upper() + p[1:].lower() for p in parts)
    return v if v[:1].isalpha() else "V" + v


def rust_type(shape):
    t = shape.type_name
    if t == "string":
        return shape.name if shape.enum else "String"
    if t in PRIMITIVE:
        return PRIMITIVE[t]
    if t == "list":
        return f"Vec<{rust_type(shape.member)}>"
    if t == "structure":
        return shape.name
    raise ValueError(f"unsupported shape type {t} ({shape.name})")


def collect(shape, seen):
    if shape.name in seen:
        return
    t = shape.type_name
    if t == "structure":
        seen[shape.name] = shape
        for m in shape.members.values():
            collect(m, seen)
    elif t == "list":
        collect(shape.member, seen)
    elif t == "string" and shape.enum:
        seen[shape.name] = shape


def string_checks(shape, expr, path_expr, out, indent):
    pad = " " * indent
    lo, hi = shape.metadata.get("min"), shape.metadata.get("max")
    if lo is not None or hi is not None:
        out.append(f"{pad}check_len({path_expr}, {expr}.chars().count(), {lo if lo is not None else 0}, {hi if hi is not None else 'usize::MAX'})?;")
    if "pattern" in shape.metadata:
        out.append(f"{pad}super::patterns::{snake(shape.name)}({path_expr}, &{expr})?;")


def value_checks(shape, expr, path_expr, out, indent, is_ref=True):
    """Checks for one value of `shape`: `expr` is a reference binding, or a place if not `is_ref`."""
    pad = " " * indent
    t = shape.type_name
    if t == "string" and not shape.enum:
        string_checks(shape, expr, path_expr, out, indent)
    elif t in ("integer", "long"):
        lo, hi = shape.metadata.get("min"), shape.metadata.get("max")
        if lo is not None or hi is not None:
            value = f"*{expr}" if is_ref else expr
            out.append(f"{pad}check_range({path_expr}, {value}, {lo if lo is not None else 'i64::MIN'}, {hi if hi is not None else 'i64::MAX'})?;")
    elif t == "structure":
        out.append(f"{pad}{expr}.validate({path_expr})?;")
    elif t == "list":
        lo, hi = shape.metadata.get("min"), shape.metadata.get("max")
        if lo is not None or hi is not None:
            out.append(f"{pad}check_count({path_expr}, {expr}.len(), {lo if lo is not None else 0}, {hi if hi is not None else 'usize::MAX'})?;")
        inner = []
        value_checks(shape.member, "item", "&format!(\"{}[{i}]\", " + path_expr.lstrip("&") + ")", inner, indent + 4)
        if inner:
            out.append(f"{pad}for (i, item) in {expr}.iter().enumerate() {{")
            out.extend(inner)
            out.append(f"{pad}}}")


def gen_struct(shape, out):
    required = set(shape.metadata.get("required", []))
    is_union = shape.metadata.get("union", False)
    all_optional = not required
    doc = "A union in the model: exactly one member is set." if is_union else f"The model's `{shape.name}`."
    out.append(f"/// {doc}")
    derives = "Clone, Debug, PartialEq, Serialize, Deserialize" + (", Default" if all_optional else "")
    out.append(f"#[derive({derives})]")
    out.append(f"pub struct {shape.name} {{")
    for mname, m in shape.members.items():
        ty = rust_type(m)
        field = snake(mname)
        if mname in required:
            out.append(f"    #[serde(rename = \"{mname}\")]")
            out.append(f"    pub {field}: {ty},")
        else:
            out.append(f"    #[serde(rename = \"{mname}\", default, skip_serializing_if = \"Option::is_none\")]")
            out.append(f"    pub {field}: Option<{ty}>,")
    out.append("}")
    out.append("")
    body = []
    for mname, m in shape.members.items():
        field = snake(mname)
        path = f"&join(path, \"{mname}\")"
        checks = []
        if mname in required:
            value_checks(m, f"self.{field}", path, checks, 8, is_ref=False)
            body.extend(checks)
        else:
            value_checks(m, "v", path, checks, 12)
            if checks:
                body.append(f"        if let Some(v) = &self.{field} {{")
                body.extend(checks)
                body.append("        }")
    if is_union:
        members = list(shape.members.items())
        count = " + ".join(f"usize::from(self.{snake(n)}.is_some())" for n, _ in members)
        names = ", ".join(members_name for members_name, _ in members)
        body.append(f"        check_union(path, {count}, \"{names}\")?;")
    out.append(f"impl Validate for {shape.name} {{")
    unused = "" if body else "_"
    out.append(f"    fn validate(&self, {unused}path: &str) -> Result<(), FieldError> {{")
    out.extend(body)
    out.append("        Ok(())")
    out.append("    }")
    out.append("}")
    out.append("")


def gen_enum(shape, out):
    out.append(f"/// The model's `{shape.name}` enum.")
    out.append("#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]")
    out.append(f"pub enum {shape.name} {{")
    for v in shape.enum:
        out.append(f"    #[serde(rename = \"{v}\")]")
        out.append(f"    {variant(v)},")
    out.append("}")
    out.append("")
    out.append(f"impl {shape.name} {{")
    out.append("    pub fn as_str(self) -> &'static str {")
    out.append("        match self {")
    for v in shape.enum:
        out.append(f"            {shape.name}::{variant(v)} => \"{v}\",")
    out.append("        }")
    out.append("    }")
    out.append("}")
    out.append("")


def generate():
    model = botocore.session.get_session().get_service_model("appmesh")
    roots = []
    bodies = []
    for op_name in model.operation_names:
        op = model.operation_model(op_name)
        shape = op.input_shape
        body = {n: m for n, m in shape.members.items() if "location" not in m.serialization}
        if body:
            bodies.append((shape, body))
            roots.extend(body.values())
    seen = {}
    for r in roots:
        collect(r, seen)
    out = [
        "//! GENERATED by scripts/gen_model.py from botocore's appmesh 2019-01-25 model. Do not edit;",
        "//! run `.venv/bin/python scripts/gen_model.py` after changing the generator.",
        "",
        "#![allow(clippy::all, clippy::pedantic, unreachable_pub, missing_docs)]",
        "",
        "use serde::{Deserialize, Serialize};",
        "",
        "use super::validate::{FieldError, Validate, check_count, check_len, check_range, check_union, join};",
        "",
    ]
    for name in sorted(seen):
        s = seen[name]
        if s.type_name == "structure":
            gen_struct(s, out)
        else:
            gen_enum(s, out)
    out.append("// === Request bodies: the members of each operation's input that travel in the body ===")
    out.append("")
    for shape, body in sorted(bodies, key=lambda b: b[0].name):
        required = set(shape.metadata.get("required", []))
        name = shape.name.replace("Input", "Body")
        out.append(f"/// The body members of `{shape.name}` (URI and query members come from the request line).")
        out.append("#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]")
        out.append(f"pub struct {name} {{")
        checks = []
        for mname, m in body.items():
            ty = rust_type(m)
            field = snake(mname)
            path = f"&join(path, \"{mname}\")"
            if mname in required:
                out.append(f"    #[serde(rename = \"{mname}\")]")
                out.append(f"    pub {field}: {ty},")
                value_checks(m, f"self.{field}", path, checks, 8, is_ref=False)
            else:
                out.append(f"    #[serde(rename = \"{mname}\", default, skip_serializing_if = \"Option::is_none\")]")
                out.append(f"    pub {field}: Option<{ty}>,")
                inner = []
                value_checks(m, "v", path, inner, 12)
                if inner:
                    checks.append(f"        if let Some(v) = &self.{field} {{")
                    checks.extend(inner)
                    checks.append("        }")
        out.append("}")
        out.append("")
        out.append(f"impl Validate for {name} {{")
        unused = "" if checks else "_"
        out.append(f"    fn validate(&self, {unused}path: &str) -> Result<(), FieldError> {{")
        out.extend(checks)
        out.append("        Ok(())")
        out.append("    }")
        out.append("}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main():
    text = generate()
    if "--check" in sys.argv:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is out of date: run .venv/bin/python scripts/gen_model.py", file=sys.stderr)
            sys.exit(1)
        return
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
