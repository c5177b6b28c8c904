//! `weftctl check`: preflight of this host (can a node agent run here?) and, with a
//! kubeconfig, of the cluster (is weft installed and working?). Every failed check
//! says how to fix it.

use crate::output::Report;
use serde_json::json;
use weft_runtime::mountinfo::mounts_of;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// How to fix it, when it failed.
    pub fix: String,
}

fn check(name: &'static str, ok: bool, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name,
        ok,
        detail: detail.into(),
        fix: if ok { String::new() } else { fix.into() },
    }
}

/// `major.minor` of a kernel release string such as `6.18.0-1-amd64`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Effective capability bits from /proc/self/status text.
pub fn effective_caps(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

pub fn host_checks(ports: &[u16]) -> Vec<Check> {
    let mut out = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let v = kernel_version(&release);
    out.push(check(
        "kernel",
        v.is_some_and(|v| v >= (5, 15)),
        format!("Linux {release}"),
        "weft needs Linux 5.15 or newer (cgroup sock_addr hooks, sk_lookup, BTF)",
    ));
    out.push(check(
        "sk_lookup",
        v.is_some_and(|v| v >= (5, 9)),
        "BPF_PROG_TYPE_SK_LOOKUP (Linux 5.9+), used to steer inbound traffic",
        "upgrade the kernel to 5.15 or newer",
    ));
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    out.push(check(
        "btf",
        btf,
        if btf {
            "/sys/kernel/btf/vmlinux present"
        } else {
            "/sys/kernel/btf/vmlinux missing"
        },
        "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (most distribution kernels are)",
    ));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let show = |v: &[std::path::PathBuf]| {
        v.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cg = mounts_of(&mountinfo, "cgroup2");
    out.push(check(
        "cgroup2",
        !cg.is_empty(),
        if cg.is_empty() { "no cgroup2 mount".to_string() } else { format!("mounted at {}", show(&cg)) },
        "mount the unified hierarchy: mount -t cgroup2 none /sys/fs/cgroup (or boot with systemd.unified_cgroup_hierarchy=1)",
    ));
    let config = std::fs::read_to_string(format!("/boot/config-{release}")).unwrap_or_default();
    let cgroup_bpf = if config.is_empty() {
        None
    } else {
        Some(config.lines().any(|l| l == "CONFIG_CGROUP_BPF=y"))
    };
    out.push(check(
        "cgroup-bpf",
        cgroup_bpf != Some(false),
        match cgroup_bpf {
            Some(true) => "CONFIG_CGROUP_BPF=y".to_string(),
            Some(false) => "CONFIG_CGROUP_BPF is not set".to_string(),
            None => format!(
                "/boot/config-{release} not readable; assumed (Linux 5.15+ kernels enable it)"
            ),
        },
        "use a kernel with CONFIG_CGROUP_BPF=y",
    ));
    let bpffs = mounts_of(&mountinfo, "bpf");
    // The agent mounts one at /sys/fs/bpf when there is none; the DaemonSet
    // mounts the host's, which must then exist.
    out.push(check(
        "bpffs",
        true,
        if bpffs.is_empty() {
            "not mounted: the agent mounts it at /sys/fs/bpf (under Kubernetes, mount it on the host: mount -t bpf bpf /sys/fs/bpf)".to_string()
        } else {
            format!("mounted at {}", show(&bpffs))
        },
        "",
    ));
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = effective_caps(&status);
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .iter()
    .filter(|(bit, _)| caps & (1u64 << bit) == 0)
    .map(|(_, n)| *n)
    .collect();
    out.push(check(
        "privileges",
        missing.is_empty(),
        if missing.is_empty() {
            "CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN".to_string()
        } else {
            format!("missing {}", missing.join(", "))
        },
        "run the node agent as root (the Helm chart's DaemonSet grants exactly these)",
    ));
    for p in ports {
        let free = port_free(*p);
        out.push(check(
            "port",
            free,
            format!("{p} {}", if free { "free" } else { "in use" }),
            format!(
                "stop what listens on {p} (ss -ltnp 'sport = :{p}') or move the agent's listener"
            ),
        ));
    }
    out
}

pub async fn cluster_checks(kubeconfig: Option<&std::path::Path>, namespace: &str) -> Vec<Check> {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::Api;
    let mut out = Vec::new();
    let client = match crate::kube_client(kubeconfig).await {
        Ok(c) => c,
        Err(e) => {
            out.push(check(
                "cluster",
                false,
                format!("{e:#}"),
                "point --kubeconfig (or KUBECONFIG) at the cluster",
            ));
            return out;
        }
    };
    match client.apiserver_version().await {
        Ok(v) => out.push(check(
            "api-server",
            true,
            format!("Kubernetes {}.{}", v.major, v.minor),
            "",
        )),
        Err(e) => {
            out.push(check(
                "api-server",
                false,
                e.to_string(),
                "check the kubeconfig's server address and credentials",
            ));
            return out;
        }
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "authorizationpolicies.security.weft.dev",
        "wasmplugins.extensions.weft.dev",
    ] {
        let established = match crds.get_opt(name).await {
            Ok(Some(c)) => c
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True"),
            _ => false,
        };
        out.push(check(
            "crd",
            established,
            name,
            "install the CRDs: kubectl apply -f crds/ (the Helm chart does)",
        ));
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let (ok, detail) = match leases.get_opt("weft-control-plane").await {
        Ok(Some(l)) => {
            let spec = l.spec.unwrap_or_default();
            let holder = spec.holder_identity.unwrap_or_default();
            let fresh = spec.renew_time.is_some_and(|t| {
                k8s_openapi::jiff::Timestamp::now().as_second() - t.0.as_second()
                    <= i64::from(spec.lease_duration_seconds.unwrap_or(10))
            });
            (
                fresh && !holder.is_empty(),
                format!(
                    "leader {holder}{}",
                    if fresh { "" } else { " (lease expired)" }
                ),
            )
        }
        Ok(None) => (false, "no leader Lease".to_string()),
        Err(e) => (false, e.to_string()),
    };
    out.push(check("control-plane", ok, detail, format!("is the control plane running? kubectl -n {namespace} get pods -l app.kubernetes.io/component=control-plane")));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let ca = matches!(secrets.get_opt("weft-ca").await, Ok(Some(_)));
    out.push(check(
        "ca",
        ca,
        format!("Secret {namespace}/weft-ca"),
        "the leader creates it on start; check the control plane's logs",
    ));
    let cms: Api<ConfigMap> = Api::namespaced(client, namespace);
    let bundle = matches!(cms.get_opt("weft-ca-root-cert").await, Ok(Some(_)));
    out.push(check(
        "trust-bundle",
        bundle,
        format!("ConfigMap {namespace}/weft-ca-root-cert"),
        "the leader publishes it; check the control plane's logs",
    ));
    out
}

pub fn report(checks: &[Check]) -> Report {
    let rows = checks
        .iter()
        .map(|c| {
            vec![
                if c.ok { "ok" } else { "FAIL" }.to_string(),
                c.name.to_string(),
                c.detail.clone(),
                c.fix.clone(),
            ]
        })
        .collect();
    let failed = checks.iter().filter(|c| !c.ok).count();
    Report::new(json!({"checks": checks, "failed": failed}))
        .table(vec!["", "CHECK", "DETAIL", "FIX"], rows)
        .note(if failed == 0 {
            "all checks passed".to_string()
        } else {
            format!("{failed} check(s) failed")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_mounts_and_caps() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0"), Some((5, 4)));
        assert_eq!(kernel_version("junk"), None);
        let mi = "24 1 0:22 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n25 1 0:23 / /sys/fs/bpf rw - bpf bpf rw\n";
        assert_eq!(
            mounts_of(mi, "cgroup2"),
            vec![std::path::PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert_eq!(
            mounts_of(mi, "bpf"),
            vec![std::path::PathBuf::from("/sys/fs/bpf")]
        );
        assert!(mounts_of(mi, "ext4").is_empty());
        assert_eq!(
            effective_caps("Name:\tx\nCapEff:\t000001ffffffffff\n"),
            0x1ffffffffff
        );
        assert_eq!(effective_caps("CapEff:\t0000000000000000\n"), 0);
    }
}
