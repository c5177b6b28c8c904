//! `weft-cni`: weft's chained CNI plugin (CNI spec 1.0). See the `cni` module of weft-node.
//!
//! Run by the container runtime with CNI_* variables, it is the plugin. Run as
//! `weft-cni install [--bin-dir D] [--conf-dir D] [--socket S] [--wait-seconds N]`
//! (the node DaemonSet's init container), it installs itself on the host;
//! `weft-cni uninstall [--bin-dir D] [--conf-dir D]` undoes that.

#![forbid(unsafe_code)]
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

/// `weft-cni install`: copies this binary into the host's CNI bin directory and
/// chains it after the cluster network plugin in the first `.conflist`.
#[derive(clap::Parser, Debug)]
#[command(name = "weft-cni install", version)]
struct InstallArgs {
    /// The host's CNI bin directory, as mounted in this container.
    #[arg(long, default_value = "/host/opt/cni/bin")]
    bin_dir: PathBuf,
    /// The host's CNI configuration directory, as mounted in this container.
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The node agent's CNI socket, as the plugin will see it on the host.
    #[arg(long, default_value = weft_node_dataplane::DEFAULT_CNI_SOCKET)]
    socket: String,
    /// How long to wait for the cluster network plugin's `.conflist`.
    #[arg(long, default_value_t = 300)]
    wait_seconds: u64,
}

fn install(args: &[String]) -> i32 {
    use clap::Parser;
    let a = match InstallArgs::try_parse_from(
        std::iter::once("weft-cni install".to_string()).chain(args.iter().cloned()),
    ) {
        Ok(a) => a,
        Err(e) => {
            // --help and --version print and succeed; bad flags print and fail.
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let (bin_dir, conf_dir, socket, wait) = (
        a.bin_dir,
        a.conf_dir,
        a.socket,
        Duration::from_secs(a.wait_seconds),
    );
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("weft-cni install: locating this binary: {e}");
            return 1;
        }
    };
    match weft_node_dataplane::install_cni(&me, &bin_dir, &conf_dir, &socket, wait) {
        Ok(conf) => {
            println!(
                "installed {} and chained it in {}",
                bin_dir.join("weft-cni").display(),
                conf.display()
            );
            0
        }
        Err(e) => {
            eprintln!("weft-cni install: {e}");
            1
        }
    }
}

/// `weft-cni uninstall`: removes weft-cni from the chain and the binary.
#[derive(clap::Parser, Debug)]
#[command(name = "weft-cni uninstall", version)]
struct UninstallArgs {
    /// The host's CNI bin directory, as mounted in this container.
    #[arg(long, default_value = "/host/opt/cni/bin")]
    bin_dir: PathBuf,
    /// The host's CNI configuration directory, as mounted in this container.
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    conf_dir: PathBuf,
}

fn uninstall(args: &[String]) -> i32 {
    use clap::Parser;
    let a = match UninstallArgs::try_parse_from(
        std::iter::once("weft-cni uninstall".to_string()).chain(args.iter().cloned()),
    ) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match weft_node_dataplane::uninstall_cni(&a.bin_dir, &a.conf_dir) {
        Ok(changed) => {
            for c in changed {
                println!("removed weft-cni from {}", c.display());
            }
            0
        }
        Err(e) => {
            eprintln!("weft-cni uninstall: {e}");
            1
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("install") => std::process::exit(install(&args[1..])),
        Some("uninstall") => std::process::exit(uninstall(&args[1..])),
        _ => {}
    }
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let mut stdin = String::new();
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let out = weft_node_dataplane::run_cni_plugin(&env, &stdin);
    if !out.stdout.is_empty() {
        println!("{}", out.stdout);
    }
    std::process::exit(out.exit_code);
}
