fn main() -> std::process::ExitCode {
    rbee_worker::process::main()
}
