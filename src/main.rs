#![forbid(unsafe_code)]

/// mimalloc rather than the system allocator: a request allocates a few dozen small blocks
/// (header values, futures, extensions) on one thread and frees them on the same thread, which
/// glibc's malloc serves slowly (about a tenth of the gateway's user time went to it); README
/// "Benchmarks" has the numbers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    stepgate::cli::main()
}
