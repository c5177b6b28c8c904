//! `weft-cni`: weft's chained CNI plugin (CNI spec 1.0). See `weft_node::cni`.
//!
//! Run by the container runtime with CNI_* variables, it is the plugin. Run as
//! `weft-cni install [--bin-dir D] [--conf-dir D] [--socket S] [--wait-seconds N]`
//! (the node DaemonSet's init container), it installs itself on the host.
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

fn install(args: &[String]) -> i32 {
    let mut bin_dir = PathBuf::from("/host/opt/cni/bin");
    let mut conf_dir = PathBuf::from("/host/etc/cni/net.d");
    let mut socket = weft_node::cni::plugin::DEFAULT_SOCKET.to_string();
    let mut wait = Duration::from_secs(300);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else {
            eprintln!("weft-cni install: {flag} needs a value");
            return 2;
        };
        match flag.as_str() {
            "--bin-dir" => bin_dir = value.into(),
            "--conf-dir" => conf_dir = value.into(),
            "--socket" => socket = value.clone(),
            "--wait-seconds" => match value.parse() {
                Ok(s) => wait = Duration::from_secs(s),
                Err(e) => {
                    eprintln!("weft-cni install: --wait-seconds {value:?}: {e}");
                    return 2;
                }
            },
            other => {
                eprintln!("weft-cni install: unknown flag {other} (known: --bin-dir, --conf-dir, --socket, --wait-seconds)");
                return 2;
            }
        }
    }
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("weft-cni install: locating this binary: {e}");
            return 1;
        }
    };
    match weft_node::cni::install::install(&me, &bin_dir, &conf_dir, &socket, wait) {
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("install") {
        std::process::exit(install(&args[1..]));
    }
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let mut stdin = String::new();
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let out = weft_node::cni::plugin::run(&env, &stdin);
    if !out.stdout.is_empty() {
        println!("{}", out.stdout);
    }
    std::process::exit(out.exit_code);
}
