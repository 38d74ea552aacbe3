"""DNS interceptor (installed as gateway.dns; the folder is dns/)."""
