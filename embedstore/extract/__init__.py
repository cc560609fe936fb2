"""The extraction pass: backbones (the registry), region readers, tiled context, the pass
itself (`pipeline`) and its Ray form (`distributed`)."""
