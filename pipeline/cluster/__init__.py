"""Running the training stages on a cluster's workers, started by a cluster manager (Ray), never by our own code."""
