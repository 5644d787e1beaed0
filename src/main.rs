// jemalloc: per-change allocations freed on another thread are where glibc
// malloc spent a third of the daemon's CPU (BENCHMARKS.md, profile of scenario 1).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    usersync::cli::main()
}
