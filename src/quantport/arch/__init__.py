"""Model-structure knowledge, held as data: fused sibling groups, attention modules, checkpoint (hub) names."""
