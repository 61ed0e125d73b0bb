"""The networks: the 3D UNet (config, attention processors, blocks, the UNet itself) and the image-feature mapper.
Module and parameter names mirror the released checkpoint's keys."""
