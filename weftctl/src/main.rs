//! weftctl: answers "is it working, who talks to whom, and why was this denied?".
//!
//! Exit codes: 0 = success / allowed / no findings; 1 = a check failed, the traffic
//! is denied, or analyze found errors or warnings; 2 = bad usage or input (the
//! message says which).

#![forbid(unsafe_code)]

mod analyze;
mod authz;
mod check;
mod inputs;
mod output;
mod remote;

use clap::{Parser, Subcommand};
use output::Format;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "weftctl", version, about = "Operate and debug a weft mesh")]
struct Cli {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table, global = true)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Preflight: can a node agent run on this host? With --kubeconfig (or --cluster),
    /// is weft installed and working in the cluster?
    Check {
        /// Also (or only, with --skip-host) check the cluster.
        #[arg(long)]
        cluster: bool,
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        #[arg(long, default_value = "weft-system")]
        namespace: String,
        /// Skip the host checks (e.g. on a workstation).
        #[arg(long)]
        skip_host: bool,
        /// Host ports that must be free (the node agent's admin and metrics ports).
        #[arg(long = "port", default_values_t = vec![15000u16, 15020])]
        ports: Vec<u16>,
    },
    /// Control-plane replicas (ready, leader), connected nodes with their ACK/NACK
    /// state, enrolled pods per node, certificates soonest expiry first.
    Status {
        /// Control-plane admin address(es) (host:port of --admin-addr).
        #[arg(long = "control-plane", default_values_t = vec!["127.0.0.1:15014".to_string()])]
        control_plane: Vec<String>,
        /// A node's admin address: `<node>=<host:port>` (repeatable).
        #[arg(long = "node", value_parser = remote::parse_node_admin)]
        nodes: Vec<(String, String)>,
    },
    /// Authorization.
    Authz {
        #[command(subcommand)]
        command: AuthzCommand,
    },
    /// Everything a node holds (workloads, services, policies, plugins, certificates).
    ConfigDump {
        node: String,
        /// The node's admin address (host:port of its --admin-addr).
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: String,
    },
    /// The certificates a node holds.
    Certs {
        node: String,
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: String,
    },
    /// Lint a manifest directory or the cluster: invalid objects, policies that select
    /// nothing, unknown namespaces or service accounts, L7 fields on ports that are not
    /// HTTP, shadowed policies.
    Analyze {
        #[command(flatten)]
        source: inputs::Source,
    },
}

#[derive(Subcommand)]
enum AuthzCommand {
    /// Would this connection or request be allowed, and by which policy and rule?
    Check {
        #[command(flatten)]
        source: inputs::Source,
        #[command(flatten)]
        args: authz::CheckArgs,
    },
}

/// A client from an explicit kubeconfig, else the usual inference.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let client = weft_runtime::kube_client(kubeconfig).await;
    match kubeconfig {
        Some(_) => client,
        None => client.map_err(|e| e.context("give --kubeconfig, set KUBECONFIG, or use --dir")),
    }
}

enum Outcome {
    Ok,
    /// Denied, failed checks, findings.
    Negative,
}

async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let emit = |r: &output::Report| print!("{}", r.render(cli.output));
    let ok = |b: bool| if b { Outcome::Ok } else { Outcome::Negative };
    match cli.command {
        Command::Check {
            cluster,
            kubeconfig,
            namespace,
            skip_host,
            ports,
        } => {
            let mut checks = Vec::new();
            if !skip_host {
                checks.extend(check::host_checks(&ports));
            }
            if cluster || kubeconfig.is_some() {
                checks.extend(check::cluster_checks(kubeconfig.as_deref(), &namespace).await);
            }
            emit(&check::report(&checks));
            Ok(ok(checks.iter().all(|c| c.ok)))
        }
        Command::Status {
            control_plane,
            nodes,
        } => {
            let (r, healthy) = remote::status(&control_plane, &nodes)?;
            emit(&r);
            Ok(ok(healthy))
        }
        Command::Authz {
            command: AuthzCommand::Check { source, args },
        } => {
            let mesh = inputs::load(&source).await?;
            let (r, allowed) = authz::check(&mesh, &args)?;
            emit(&r);
            Ok(ok(allowed))
        }
        Command::ConfigDump { node, admin } => {
            emit(&remote::config_dump(&node, &admin)?);
            Ok(Outcome::Ok)
        }
        Command::Certs { node, admin } => {
            emit(&remote::certs(&node, &admin)?);
            Ok(Outcome::Ok)
        }
        Command::Analyze { source } => {
            let mesh = inputs::load(&source).await?;
            let findings = analyze::analyze(&mesh);
            emit(&analyze::report(&findings));
            Ok(ok(findings.is_empty()))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weftctl: error: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::Negative) => ExitCode::from(1),
        Err(e) => {
            eprintln!("weftctl: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
