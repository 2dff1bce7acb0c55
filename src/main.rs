#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    stepgate::cli::main()
}
