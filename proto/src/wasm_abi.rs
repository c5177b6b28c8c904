//! The Proxy-Wasm module contract both the control plane (admission) and the node
//! (loading) check, from a module's export names.

/// `spec.limits.cpuTimePerCallbackMillis` when not set.
pub const DEFAULT_CPU_MILLIS_PER_CALLBACK: u64 = 10;
/// The largest `spec.limits.cpuTimePerCallbackMillis` accepted (1 s): a headers
/// callback that needs longer is broken, and the node refuses to spend more of a
/// core on one.
pub const MAX_CPU_MILLIS_PER_CALLBACK: u64 = 1000;
/// `spec.limits.memoryBytes` when not set (16 MiB).
pub const DEFAULT_MEMORY_BYTES: u64 = 16 << 20;
/// The smallest `spec.limits.memoryBytes` accepted: one Wasm page.
pub const MIN_MEMORY_BYTES: u64 = 64 << 10;
/// The largest `spec.limits.memoryBytes` accepted (256 MiB). A plugin has one
/// instance per node-agent worker thread, each with this cap.
pub const MAX_MEMORY_BYTES: u64 = 256 << 20;

/// ABI versions this project runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbiVersion {
    V0_2_0,
    V0_2_1,
}

/// Checks a module's exports: a supported `proxy_abi_version_*`, `memory`,
/// `proxy_on_context_create`, and an allocator (`proxy_on_memory_allocate`, or
/// `malloc` as AssemblyScript SDKs export).
pub fn check_exports<'a>(exports: impl IntoIterator<Item = &'a str>) -> Result<AbiVersion, String> {
    let names: std::collections::BTreeSet<&str> = exports.into_iter().collect();
    let has = |n: &str| names.contains(n);
    let abi = if has("proxy_abi_version_0_2_1") {
        AbiVersion::V0_2_1
    } else if has("proxy_abi_version_0_2_0") {
        AbiVersion::V0_2_0
    } else {
        let other: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| n.starts_with("proxy_abi_version_"))
            .collect();
        return Err(if other.is_empty() {
            "no proxy_abi_version_* export: not a Proxy-Wasm module".into()
        } else {
            format!(
                "unsupported ABI {}: this host runs proxy_abi_version_0_2_1 and 0_2_0",
                other.join(", ")
            )
        });
    };
    let mut missing = Vec::new();
    for n in ["memory", "proxy_on_context_create"] {
        if !has(n) {
            missing.push(n);
        }
    }
    if !has("proxy_on_memory_allocate") && !has("malloc") {
        missing.push("proxy_on_memory_allocate (or malloc)");
    }
    if !missing.is_empty() {
        return Err(format!("missing exports: {}", missing.join(", ")));
    }
    Ok(abi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_contract() {
        let ok = [
            "proxy_abi_version_0_2_1",
            "memory",
            "proxy_on_context_create",
            "malloc",
        ];
        assert_eq!(check_exports(ok), Ok(AbiVersion::V0_2_1));
        let v020 = [
            "proxy_abi_version_0_2_0",
            "memory",
            "proxy_on_context_create",
            "proxy_on_memory_allocate",
        ];
        assert_eq!(check_exports(v020), Ok(AbiVersion::V0_2_0));
        assert!(check_exports(["memory"])
            .unwrap_err()
            .contains("not a Proxy-Wasm module"));
        assert!(check_exports(["proxy_abi_version_0_1_0"])
            .unwrap_err()
            .contains("unsupported ABI proxy_abi_version_0_1_0"));
        assert_eq!(
            check_exports(["proxy_abi_version_0_2_1"]).unwrap_err(),
            "missing exports: memory, proxy_on_context_create, proxy_on_memory_allocate (or malloc)"
        );
    }
}
