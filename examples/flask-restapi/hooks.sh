# Source this before sconify_image: the two policy hooks for the Flask example.
#
# SECRETS defines, in the session, a CA (api_ca_key, api_ca_cert; the CA certificate is
# exported so clients can fetch it from the CAS) and a TLS certificate for the DNS name "api"
# that this CA issues (flask_key, flask). INJECTED_FILES writes that certificate and key to
# /tls/flask.crt and /tls/flask.key, the paths rest_api.py reads, once the service has
# attested; they replace the image's placeholder pair.
export SECRETS=$(cat <<EOF
secrets:
    - name: api_ca_key
      kind: private-key
    - name: api_ca_cert
      kind: x509-ca
      export_public: true
      private_key: api_ca_key
    - name: flask_key
      kind: private-key
    - name: flask
      kind: x509
      private_key: flask_key
      issuer: api_ca_cert
      dns:
        - api
EOF
)

export INJECTED_FILES=$(cat <<EOF
     injection_files:
        - path: "/tls/flask.crt"
          content: \$\$SCONE::flask.crt\$\$
        - path: "/tls/flask.key"
          content: "\$\$SCONE::flask.key\$\$"
EOF
)
