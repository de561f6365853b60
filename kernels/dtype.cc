namespace kvcompress {}
