"""bumper's shipped inspection addons; installed as the `bumper_addons` package. See docs/addons.md."""
