# Source this before sconify_image: the two policy hooks for the Flask example.
#
# SECRETS defines a CA in the session: the key api_ca_key and the certificate api_ca_cert,
# which is exported so clients can fetch it from the CAS. The CA issues the TLS certificate
# flask for the DNS name "api", with the key flask_key. INJECTED_FILES writes that
# certificate and key to /tls/flask.crt and /tls/flask.key, the paths rest_api.py reads,
# once the service has attested. They replace the image's placeholder pair.
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
