"""MobileSAM networks, checkpoint loading and geometry."""
