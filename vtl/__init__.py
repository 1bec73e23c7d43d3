"""vtl: transfer learning from Keras VGG weights in JAX/Flax, with a cached trunk."""
