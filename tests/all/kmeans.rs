//! Tests of the kmeans family.
