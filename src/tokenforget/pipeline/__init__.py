"""The pipeline layer: one run folder's stages resolved in the order of the data's journey (`resolver.Run` over the stage
records), and variants of a run (`variants`)."""
