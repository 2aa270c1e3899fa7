//! Evaluation protocols: feature extraction, k-NN (DINO) and leave-one-out 1-NN, linear probe, fine-tuning.
pub mod linear;
pub mod linear_sweep;
pub mod extract;
pub mod knn;
pub mod finetune;
