"""What the tests share: generated media, RTSP servers, subprocess helpers, the oracle."""
