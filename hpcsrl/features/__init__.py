"""What an encoder's features are and how they are measured, shared by training and evaluation:
extraction and freeze digests, k-NN, the collapse monitor and precise-BN re-estimation."""
