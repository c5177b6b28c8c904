//! `weft-cni`: weft's chained CNI plugin (CNI spec 1.0). See `weft_node::cni`.
use std::io::Read;

fn main() {
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let mut stdin = String::new();
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let out = weft_node::cni::plugin::run(&env, &stdin);
    if !out.stdout.is_empty() {
        println!("{}", out.stdout);
    }
    std::process::exit(out.exit_code);
}
