//! The `train` binary: retrains and evaluates the router's LoRA adapter.
//! (Training and evaluation land with the trainer issue; for now it only
//! reports what it will do.)

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("train: the trainer and evaluator are not built yet (see the trainer issue)");
    ExitCode::FAILURE
}
