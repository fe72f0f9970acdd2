//! `vmm`: run serverless functions in a KVM unikernel, cold or from snapshots.

use clap::{Parser, Subcommand};
use vmm::cli::{self, FunctionArgs, InvokeArgs};

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "Run WebAssembly functions in a native KVM unikernel; start them from snapshots."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot the guest cold and run one function: request on stdin, response on stdout.
    ///
    /// Example: vmm run --module qjs-wasi-reactor.wasm --runtime qjs --file hello.js --arg hello.js < req.json
    Run {
        #[command(flatten)]
        function: FunctionArgs,
        #[command(flatten)]
        invoke: InvokeArgs,
        /// Guest RAM in MiB (sparse: untouched memory costs nothing).
        #[arg(long, value_name = "MIB", default_value_t = vmm_abi::layout::DEFAULT_MEM_MIB)]
        mem: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run {
            function,
            invoke,
            mem,
        } => {
            let prepared = function
                .to_spec()
                .and_then(|spec| Ok((spec, invoke.read_input()?, invoke.limits(mem)?)));
            match prepared {
                Ok((spec, input, limits)) => {
                    let report = vmm::run::run_cold(&spec, &input, &limits);
                    cli::finish(&report, &invoke)
                }
                Err(e) => {
                    eprintln!("vmm: error: {e}");
                    cli::EXIT_FAILURE
                }
            }
        }
    };
    std::process::exit(code);
}
