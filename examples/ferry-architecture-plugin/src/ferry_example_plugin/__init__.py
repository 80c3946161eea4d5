"""An example Ferry architecture plugin (docs/conversion.md, "Your own architecture")."""
