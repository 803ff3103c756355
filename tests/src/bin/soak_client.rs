//! Test helper: the soak's killable client (see `strata_bench::soak::victim`). The soak
//! test starts it with one JSON argument and kills it with SIGKILL while it holds leases.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    strata_bench::soak::victim::main(&args)
}
