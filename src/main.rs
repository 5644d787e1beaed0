fn main() -> std::process::ExitCode {
    usersync::cli::main()
}
