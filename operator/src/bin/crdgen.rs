//! Prints the `DerpRegion` CustomResourceDefinition as YAML (feeds `crds/` and the chart).

use kube::CustomResourceExt;

fn main() -> anyhow::Result<()> {
    let yaml = serde_yaml::to_string(&derp_operator::crd::DerpRegion::crd())?;
    #[allow(clippy::print_stdout, reason = "crdgen's output is the CRD on stdout")]
    {
        print!("{yaml}");
    }
    Ok(())
}
