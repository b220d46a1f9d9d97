//! `partita check-config`: resolve a node's configuration like `partita node` would and print
//! every problem at once (exit 1), or a summary (exit 0).

use std::ffi::OsString;

use crate::node::config::resolve;

pub fn run(args: &[OsString]) -> anyhow::Result<()> {
    match resolve(args) {
        Ok((opts, layered)) => {
            println!(
                "configuration OK: {} setting(s) from the file, {} from the environment, flags on top",
                layered.from_file, layered.from_env
            );
            println!("{opts:#?}");
            Ok(())
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            anyhow::bail!("{} problem(s) in the configuration", errors.len())
        }
    }
}
