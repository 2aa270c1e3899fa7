//! Models: the ViT encoder (timm names), the Latent MIM decoder and the full Latent MIM model.
pub mod decoder;
pub mod flops;
pub mod lmim;
pub mod pos_embed;
pub mod vit;

pub use vit::{VisionTransformer, VitConfig, VitOutput};
