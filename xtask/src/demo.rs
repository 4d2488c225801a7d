pub fn run(_: &DemoArgs) -> anyhow::Result<()> { Ok(()) } #[derive(Debug, clap::Args)] pub struct DemoArgs {}
