pub fn run(_: &BenchArgs) -> anyhow::Result<()> { Ok(()) } #[derive(Debug, clap::Args)] pub struct BenchArgs {}
