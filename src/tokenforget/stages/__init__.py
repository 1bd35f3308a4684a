"""The stages of the data's journey, in order: data, noise, reference, score, partition, labels, train sets, evaluate."""
