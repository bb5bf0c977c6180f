// web client
