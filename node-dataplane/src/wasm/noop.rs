//! Exported functions that do nothing. Each call into an instance costs a few
//! hundred instructions of entry, trap-handler and epoch set-up before any plugin
//! code runs, and many plugins export lifecycle callbacks with empty bodies (a C
//! plugin's `proxy_on_log`, say). Calling a function whose body is empty, or only
//! returns a constant, has no effect anyone could observe, so the host skips the
//! lifecycle callbacks found here.

use std::collections::HashSet;
use wasmparser::{ExternalKind, Operator, Parser, Payload, TypeRef};

/// Names of the exported functions whose body declares no locals and runs no
/// instruction besides returning a constant (or nothing). `bytes` must be a valid
/// module (compiled already).
pub fn no_op_exports(bytes: &[u8]) -> Result<HashSet<String>, wasmparser::BinaryReaderError> {
    let mut imported_funcs = 0u32;
    let mut exports: Vec<(u32, String)> = Vec::new();
    let mut empty: HashSet<u32> = HashSet::new();
    let mut defined = 0u32;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload? {
            Payload::ImportSection(r) => {
                for imp in r.into_imports() {
                    if matches!(imp?.ty, TypeRef::Func(_)) {
                        imported_funcs += 1;
                    }
                }
            }
            Payload::ExportSection(r) => {
                for e in r {
                    let e = e?;
                    if e.kind == ExternalKind::Func {
                        exports.push((e.index, e.name.to_string()));
                    }
                }
            }
            Payload::CodeSectionEntry(body) => {
                let index = imported_funcs + defined;
                defined += 1;
                if body.get_locals_reader()?.get_count() != 0 {
                    continue;
                }
                let mut ops = body.get_operators_reader()?;
                let mut consts = 0;
                let mut only_consts = true;
                while !ops.eof() {
                    match ops.read()? {
                        Operator::I32Const { .. } | Operator::I64Const { .. } => consts += 1,
                        Operator::Nop | Operator::End => {}
                        _ => only_consts = false,
                    }
                }
                // A valid body returns at most one value here (the ABI's callbacks
                // return none or one), so one constant at most.
                if only_consts && consts <= 1 {
                    empty.insert(index);
                }
            }
            _ => {}
        }
    }
    Ok(exports
        .into_iter()
        .filter(|(i, _)| empty.contains(i))
        .map(|(_, name)| name)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bodies_without_effects_are_no_ops() {
        let wat = r#"(module
          (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
          (global $g (mut i32) (i32.const 0))
          (func (export "empty"))
          (func (export "constant") (param i32) (result i32) (i32.const 1))
          (func (export "nop") (nop))
          (func (export "global") (param i32 i32) (global.set $g (i32.const 1)))
          (func (export "local") (local i32))
          (func (export "calls") (drop (call $log (i32.const 0) (i32.const 0) (i32.const 0))))
          (func (export "returns_param") (param i32) (result i32) (local.get 0))
          (func (export "traps") (unreachable))
          (func $inner)
          (export "also_empty" (func $inner))
          (export "log" (func $log)))"#;
        let bytes = wat::parse_str(wat).unwrap();
        let mut got: Vec<String> = no_op_exports(&bytes).unwrap().into_iter().collect();
        got.sort();
        assert_eq!(got, ["also_empty", "constant", "empty", "nop"]);
    }
}
