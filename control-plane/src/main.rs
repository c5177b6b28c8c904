#![deny(unsafe_code)]
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;
use weft_control_plane::app::{self, Settings, SourceSettings};
use weft_control_plane::identity::authority::{Phase, View};
use weft_control_plane::identity::ca::new_root;
use weft_control_plane::identity::ca::write_private;
use weft_control_plane::identity::stored::{files, PemCa};
use weft_control_plane::k8s::ca_secret::CaSecret;
use weft_control_plane::k8s::KubeSettings;
use weft_proto::spiffe::{TrustDomain, DEFAULT_TRUST_DOMAIN};
use weft_runtime::logging::{self, LogFormat};

/// weft control plane: watches the mesh configuration, runs the mesh CA and
/// pushes config and certificates to node agents.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "WEFT_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct CaArgs {
    /// Directory for persistent state (the CA key and certificate live in <dir>/ca, mode 0600).
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft")]
    state_dir: PathBuf,
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: TrustDomain,
    /// User-provided CA certificate (may be an intermediate, followed by its issuers).
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// Private key of --ca-cert (PEM).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Root certificate(s) for the trust bundle; required when --ca-cert is an intermediate.
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
    /// Lifetime of workload SVIDs.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    svid_ttl: Duration,
}

#[derive(clap::Args, Clone)]
struct KubeArgs {
    /// Watch the Kubernetes API (in-cluster config, or --kubeconfig).
    #[arg(long, env = "WEFT_KUBERNETES")]
    kubernetes: bool,
    /// Kubeconfig file (default: the in-cluster ServiceAccount).
    #[arg(long, env = "KUBECONFIG", requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// The control plane's namespace: leader Lease, CA Secret, node agents.
    #[arg(long, env = "WEFT_NAMESPACE", default_value = "weft-system")]
    namespace: String,
    /// ServiceAccount of the node agents (its tokens are the only ones accepted).
    #[arg(long, default_value = "weft-node")]
    node_service_account: String,
    /// Audience of the node agents' projected ServiceAccount tokens.
    #[arg(long, default_value = weft_control_plane::k8s::token_review::DEFAULT_AUDIENCE)]
    token_audience: String,
    /// This replica's name in the leader Lease (default: the pod name, else host and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    #[arg(long, default_value = "weft-control-plane")]
    lease_name: String,
    /// Secret holding the CA (created by the leader when absent).
    #[arg(long, default_value = "weft-ca")]
    ca_secret: String,
}

impl KubeArgs {
    fn settings(self) -> KubeSettings {
        let identity = self.identity.unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "weft".into());
            format!("{host}-{}", std::process::id())
        });
        KubeSettings {
            kubeconfig: self.kubeconfig,
            namespace: self.namespace,
            node_service_account: self.node_service_account,
            token_audience: self.token_audience,
            identity,
            lease_name: self.lease_name,
            ca_secret: self.ca_secret,
        }
    }
}

// Parsed once at startup; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the control plane: standalone on a directory of manifests
    /// (--config-dir), or against the Kubernetes API (--kubernetes).
    Run {
        /// Directory of Kubernetes-style YAML manifests (watched for changes).
        #[arg(
            long,
            env = "WEFT_CONFIG_DIR",
            required_unless_present = "kubernetes",
            conflicts_with = "kubernetes"
        )]
        config_dir: Option<PathBuf>,
        #[command(flatten)]
        kube: KubeArgs,
        #[command(flatten)]
        ca: CaArgs,
        /// Policies in this namespace apply mesh-wide.
        #[arg(long, default_value = "weft-system")]
        root_namespace: String,
        /// gRPC (TLS) address node agents connect to.
        #[arg(long, default_value = "0.0.0.0:15012")]
        grpc_addr: SocketAddr,
        /// Admin HTTP address: /metrics, /healthz/ready, /debug/status, /jwks.json.
        #[arg(long, default_value = "127.0.0.1:15014")]
        admin_addr: SocketAddr,
        /// DNS names in the serving certificate (nodes verify one of them).
        #[arg(long = "server-name", default_values_t = vec!["weft-control-plane".to_string(), "localhost".to_string()])]
        server_names: Vec<String>,
        /// Give pods that name no ServiceAccount, and mirror (static) pods, the identity
        /// of their namespace's `default` ServiceAccount. Off by default: such pods are
        /// not enrolled and get no certificate (see docs/identity.md).
        #[arg(long, env = "WEFT_DEFAULT_IDENTITY_FALLBACK")]
        default_identity_fallback: bool,
        /// Standalone: lifetime of the node credentials issued when node agents renew
        /// theirs (at half life). At least 10s.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        node_credential_ttl: Duration,
        /// Lifetime of the JWT-SVIDs signed for node agents' Workload API
        /// (10s to 24h).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        jwt_svid_ttl: Duration,
        /// Least time each phase of a CA rotation lasts (trusting, reissuing); a phase
        /// also waits for every connected node (see docs/identity.md).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        ca_rotation_min_phase: Duration,
    },
    /// Rotate the CA without downtime: stage a new CA (a new self-signed root, or
    /// --new-ca-cert/--new-ca-key) beside the current one. A running control plane
    /// picks it up within seconds, has every node trust both, switches signing to
    /// the new one, has every certificate re-issued, then retires the old CA.
    RotateCa {
        #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft")]
        state_dir: PathBuf,
        #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: TrustDomain,
        #[command(flatten)]
        kube: KubeArgs,
        /// The new CA certificate (may be an intermediate, followed by its issuers).
        #[arg(long, requires = "new_ca_key")]
        new_ca_cert: Option<PathBuf>,
        /// Private key of --new-ca-cert (PEM).
        #[arg(long, requires = "new_ca_cert")]
        new_ca_key: Option<PathBuf>,
        /// Root certificate(s) of --new-ca-cert when it is an intermediate.
        #[arg(long, requires = "new_ca_cert")]
        new_ca_bundle: Option<PathBuf>,
    },
    /// Create a node agent's credential (client certificate, key and trust bundle).
    NodeCredential {
        #[command(flatten)]
        ca: CaArgs,
        /// Node name the credential is bound to.
        #[arg(long)]
        node: String,
        /// Output directory: node.crt, node.key (0600) and ca.crt are written there.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime; the node agent renews its credential at half life (keep the
        /// directory writable by the agent so a renewed credential survives restarts).
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Revoke node credentials (standalone): adds an entry to
    /// <state-dir>/revoked-node-credentials.yaml, which a running control plane
    /// re-reads within a second: it then refuses the credential and closes the
    /// connections that presented it.
    RevokeNodeCredential {
        #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft")]
        state_dir: PathBuf,
        /// Revoke every credential of this node issued until now (renewed ones
        /// included); issue a new one with `node-credential` afterwards.
        #[arg(long, required_unless_present = "serial", conflicts_with = "serial")]
        node: Option<String>,
        /// Revoke one credential by its serial number (hex, as `node-credential` printed it).
        #[arg(long)]
        serial: Option<String>,
        /// Why (kept in the list and logged).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Print (or write into a directory) the CustomResourceDefinitions.
    Crds {
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

// jemalloc returns memory freed after bursts (initial syncs, big config changes) to the
// OS far better than glibc's per-thread arenas.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc options (overridable with `_RJEM_MALLOC_CONF`): a background thread
/// returns freed pages after 1 s instead of keeping startup and burst memory; this
/// halves the node agent's idle RSS (see BENCHMARKS.md).
#[allow(unsafe_code)] // exporting the symbol jemalloc reads its options from
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match real_main(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-control-plane: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            config_dir,
            kube,
            ca,
            root_namespace,
            grpc_addr,
            admin_addr,
            server_names,
            default_identity_fallback,
            node_credential_ttl,
            jwt_svid_ttl,
            ca_rotation_min_phase,
        } => {
            anyhow::ensure!(
                node_credential_ttl >= Duration::from_secs(10),
                "--node-credential-ttl must be at least 10s"
            );
            let source = match config_dir {
                Some(dir) => SourceSettings::Directory(dir),
                None => SourceSettings::Kubernetes(kube.settings()),
            };
            let settings = Settings {
                source,
                state_dir: ca.state_dir,
                trust_domain: ca.trust_domain,
                root_namespace,
                grpc_addr,
                admin_addr,
                server_names,
                svid_ttl: ca.svid_ttl,
                jwt_svid_ttl,
                node_credential_ttl,
                ca_cert: ca.ca_cert,
                ca_key: ca.ca_key,
                ca_bundle: ca.ca_bundle,
                default_identity_fallback,
                ca_rotation_min_phase,
            };
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(app::run(settings, weft_runtime::shutdown_signal()))
        }
        Command::NodeCredential { ca, node, out, ttl } => {
            let opts = weft_control_plane::identity::CaOptions {
                state_dir: ca.state_dir,
                trust_domain: ca.trust_domain,
                svid_ttl: ca.svid_ttl,
                user_cert: ca.ca_cert,
                user_key: ca.ca_key,
                user_bundle: ca.ca_bundle,
            };
            weft_control_plane::identity::stored::load_or_create(&opts)
                .context("loading the CA")?;
            // During a CA rotation: the CA of its phase signs, both are trusted.
            let stored = files::read(&opts.dir()).map_err(anyhow::Error::msg)?;
            let current = Arc::new(stored.current.load(&opts.trust_domain, opts.svid_ttl)?);
            let view = match (&stored.next, stored.record) {
                (Some(n), r) => {
                    let next = Arc::new(n.load(&opts.trust_domain, opts.svid_ttl)?);
                    match r.map(|r| r.phase) {
                        Some(Phase::Reissuing) => {
                            View::new(Phase::Reissuing, SystemTime::now(), next, Some(current))
                        }
                        _ => View::new(Phase::Trusting, SystemTime::now(), current, Some(next)),
                    }
                }
                (None, _) => View::stable(current),
            };
            let (cert, key) = view.signer.issue_node_credential(&node, ttl)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            write_private(&out.join("node.key"), &key)?;
            std::fs::write(out.join("node.crt"), &cert.chain_pem)?;
            std::fs::write(out.join("ca.crt"), &view.bundle_pem)?;
            println!(
                "wrote the credential of node {node:?} to {} (serial {}, valid until {})",
                out.display(),
                cert.serial_hex,
                humantime::format_rfc3339_seconds(cert.not_after)
            );
            Ok(())
        }
        Command::RevokeNodeCredential {
            state_dir,
            node,
            serial,
            reason,
        } => {
            use weft_control_plane::server::revocation::{self, Revocation};
            let path = state_dir.join(revocation::FILE_NAME);
            let revoked_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            let what = match (&node, &serial) {
                (Some(n), _) => format!("every credential of node {n:?} issued until {revoked_at}"),
                (None, Some(s)) => format!("the credential with serial {s}"),
                (None, None) => anyhow::bail!("give --node or --serial"),
            };
            revocation::append(
                &path,
                Revocation {
                    node: node.clone(),
                    serial,
                    revoked_at: revoked_at.to_string(),
                    reason,
                },
            )?;
            // A node revocation covers its whole second: wait it out, so that a
            // credential issued after this command returns is not revoked.
            if node.is_some() {
                let into = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                std::thread::sleep(Duration::from_nanos(1_000_000_000 - u64::from(into)));
            }
            println!("revoked {what} (in {})", path.display());
            Ok(())
        }
        Command::RotateCa {
            state_dir,
            trust_domain,
            kube,
            new_ca_cert,
            new_ca_key,
            new_ca_bundle,
        } => {
            // CA files are small: read at most 1 MiB of each.
            let read = |p: &PathBuf| -> anyhow::Result<String> {
                use std::io::Read;
                let mut text = String::new();
                std::fs::File::open(p)
                    .and_then(|f| f.take(1 << 20).read_to_string(&mut text))
                    .with_context(|| format!("reading {}", p.display()))?;
                anyhow::ensure!(text.len() < 1 << 20, "{}: larger than 1 MiB", p.display());
                Ok(text)
            };
            let next = match (&new_ca_cert, &new_ca_key) {
                (Some(c), Some(k)) => PemCa {
                    chain: read(c)?,
                    key: read(k)?,
                    bundle: new_ca_bundle.as_ref().map(read).transpose()?,
                },
                _ => {
                    let (cert, key) = new_root(&trust_domain)?;
                    PemCa {
                        chain: cert,
                        key,
                        bundle: None,
                    }
                }
            };
            let ca = next
                .load(&trust_domain, Duration::from_secs(3600))
                .context("the new CA does not load")?;
            let subject = weft_control_plane::rotation::describe(&ca);
            if kube.kubernetes {
                let ks = kube.settings();
                let rt = tokio::runtime::Runtime::new()?;
                rt.block_on(async {
                    let client = weft_control_plane::k8s::client(&ks).await?;
                    let secret = CaSecret::new(
                        client,
                        &ks.namespace,
                        &ks.ca_secret,
                        trust_domain.clone(),
                        Duration::from_secs(3600),
                    );
                    secret.stage_rotation(&next).await?;
                    anyhow::Ok(())
                })?;
                println!("staged {subject} in Secret {}/{}; the control plane rotates to it (weftctl status shows the phase)", ks.namespace, ks.ca_secret);
            } else {
                let dir = state_dir.join("ca");
                files::stage(&dir, &next).map_err(anyhow::Error::msg)?;
                println!("staged {subject} in {}; the control plane rotates to it (weftctl status shows the phase)", files::next_dir(&dir).display());
            }
            Ok(())
        }
        Command::Crds { out } => {
            for (name, yaml) in weft_proto::crd::all_crd_yaml() {
                match &out {
                    Some(dir) => std::fs::write(dir.join(name), yaml)
                        .with_context(|| format!("writing {}", dir.join(name).display()))?,
                    None => print!("{yaml}"),
                }
            }
            Ok(())
        }
    }
}
