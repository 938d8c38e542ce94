//! kmeans (not yet implemented).
